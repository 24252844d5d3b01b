"""The REST API's routes: a FastAPI app over one running :class:`~meshfed.node.Node`.

Access. Every request that changes state needs ``Authorization: Bearer <token>`` (the token in
the data directory, :mod:`.token`); with ``reads_need_token`` (an API listening beyond
loopback) every request does. No token: 401; a wrong one: 403. Refusals and the first use of
the token from each address go to the audit log.

Errors. What a caller got wrong is a 4xx with ``{"detail": "..."}``: 404 for an unknown job or
peer, 409 for what this node cannot do now (no market, a job posted twice), 422 for a bad
value (named). Store reads run in worker threads, never on the trio loop.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import trio
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..audit import MAX_LIMIT, AuditKind, AuditLog
from ..errors import (
    ConfigError,
    LocalProtocolError,
    MarketError,
    MeshfedError,
)
from .dashboard import add_dashboard
from .docs import docs_page
from .metrics import CONTENT_TYPE, NodeMetrics
from .models import (
    AuditEntryOut,
    BudgetOut,
    DatasetOut,
    EstimateOut,
    JobDetailOut,
    JobOut,
    JobStatusOut,
    LeaseOut,
    LedgerOut,
    ModelOut,
    PeerOut,
    Problem,
    StatementOut,
    StatsOut,
    StatusOut,
    SubmitTraining,
)
from .views import budgets, peer_out, peer_records

if TYPE_CHECKING:
    from ..market.driver import Market
    from ..market.ledger import Statement
    from ..node import Node
    from ..store import Store

__all__ = ["create_app"]

T = TypeVar("T")

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "no bearer token"},
    403: {"model": Problem, "description": "a wrong bearer token"},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Problem}}
_CONFLICT: dict[int | str, dict[str, Any]] = {409: {"model": Problem}}
_UNPROCESSABLE: dict[int | str, dict[str, Any]] = {422: {"model": Problem}}


Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))]


class _Access:
    """The bearer-token check, as two FastAPI dependencies (``read`` and ``write``)."""

    def __init__(self, node: Node, token: str, *, reads_need_token: bool) -> None:
        self._node = node
        self._token = token.encode()
        self._reads_need_token = reads_need_token
        self._clients: set[str] = set()

    def _check(self, request: Request, credentials: HTTPAuthorizationCredentials | None) -> None:
        address = request.client.host if request.client is not None else "unknown"
        if credentials is None or credentials.scheme.lower() != "bearer":
            self._node.audit_trail.coalesced(AuditKind.API_REFUSED, address, "401", "no token")
            raise HTTPException(
                401,
                "a bearer token is required (the file api.token in the node's data directory)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(credentials.credentials.encode(), self._token):
            self._node.audit_trail.coalesced(AuditKind.API_REFUSED, address, "403", "wrong token")
            raise HTTPException(403, "the bearer token is wrong")
        if address not in self._clients:
            self._clients.add(address)
            self._node.audit(AuditKind.API_NEW_CLIENT, address=address)

    # async: FastAPI runs a plain function dependency in a worker thread, and these touch the
    # node (its audit trail, the clients seen) that the event loop owns
    async def read(
        self,
        request: Request,
        credentials: Annotated[
            HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))
        ],
    ) -> None:
        if self._reads_need_token:
            self._check(request, credentials)

    async def write(
        self,
        request: Request,
        credentials: Annotated[
            HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))
        ],
    ) -> None:
        self._check(request, credentials)


async def _in_thread(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await trio.to_thread.run_sync(functools.partial(function, *args, **kwargs))


def _file_name(text: str) -> str:
    """``text`` with every character but ASCII letters, digits, ``.``, ``_`` and ``-`` as
    ``_`` (a header's file name)."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in text)


def _statement(statement: Statement) -> StatementOut:
    return StatementOut(
        escrowed_micro=statement.escrowed,
        released_micro=statement.released,
        paid_micro={str(p): a for p, a in statement.paid.items()},
        earned_micro={str(p): a for p, a in statement.earned.items()},
        forfeited_micro={str(p): a for p, a in statement.forfeited.items()},
    )


def create_app(node: Node, token: str, *, reads_need_token: bool) -> FastAPI:
    """The API of ``node`` (see the module for access and errors), with the live dashboard
    (:mod:`.dashboard`; the caller runs ``app.state.live.run``)."""
    access = _Access(node, token, reads_need_token=reads_need_token)
    read = [Depends(access.read)]
    write = [Depends(access.write)]
    metrics = NodeMetrics(node)
    app = FastAPI(
        title="meshfed node",
        summary="The REST API of one meshfed node.",
        version="1",
        docs_url=None,
        redoc_url=None,
        responses=_ERRORS,
    )

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with every 422 answer as it is sent: a :class:`Problem`."""
        if app.openapi_schema is None:
            document = FastAPI.openapi(app)
            problem = {"$ref": "#/components/schemas/Problem"}
            for operations in document["paths"].values():
                for operation in operations.values():
                    answer = operation.get("responses", {}).get("422")
                    if answer is not None:
                        answer["content"] = {"application/json": {"schema": problem}}
            schemas = document["components"]["schemas"]
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.live = add_dashboard(app, node, read=access.read, write=access.write)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()
        )
        return JSONResponse({"detail": where or "invalid request"}, status_code=422)

    def store() -> Store:
        if node.store is None:
            raise HTTPException(409, "this node runs without a store (config store_file)")
        return node.store

    def market() -> Market:
        if node.market is None:
            raise HTTPException(409, "this node runs without the market (config market)")
        return node.market

    # -- the node ------------------------------------------------------------------------------

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(docs_page(app.openapi()))

    @app.get("/status", dependencies=read)
    async def status() -> StatusOut:
        """The node at a glance."""
        # counts, not node.status(): that builds a dict of every link and member, which this
        # answer would only count (on the event loop, at every request)
        running = (
            0
            if node.market is None
            else len(node.market.work)
            + sum(1 for handle in node.market.jobs.values() if handle.buyer.state != "ended")
        )
        return StatusOut(
            peer_id=str(node.peer_id),
            listen=node.listen_addrs,
            uptime_s=node.uptime_s,
            connected=len(node.transport.connected_peers()),
            members=0 if node.membership is None else len(node.membership.peers()),
            market=node.market is not None,
            store=node.store is not None,
            jobs_running=running,
            stats=StatsOut.model_validate(node.stats.snapshot()),
        )

    @app.get("/stats", dependencies=read)
    async def stats() -> StatsOut:
        """What the node received and rejected (``node.stats``)."""
        return StatsOut.model_validate(node.stats.snapshot())

    @app.get(
        "/metrics",
        dependencies=read,
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE: {}}}},
    )
    async def prometheus() -> Response:
        """Prometheus metrics (text exposition format)."""
        return Response(await metrics.scrape(), media_type=CONTENT_TYPE)

    # -- peers and data ------------------------------------------------------------------------

    def records() -> list[Any]:
        if node.membership is None:
            raise HTTPException(409, "this node runs without membership (config membership)")
        return peer_records(node)

    @app.get("/peers", dependencies=read)
    async def peers() -> list[PeerOut]:
        """Every peer whose signed record this node holds, with membership's verdict."""
        return [peer_out(node, record) for record in records()]

    @app.get("/peers/{peer_id}", dependencies=read, responses=_NOT_FOUND | _CONFLICT)
    async def peer(peer_id: str) -> PeerOut:
        """One peer's record."""
        for record in records():
            if str(record.peer) == peer_id:
                return peer_out(node, record)
        raise HTTPException(404, f"no record of peer {peer_id!r}")

    @app.get("/datasets", dependencies=read, responses=_CONFLICT)
    async def datasets() -> list[DatasetOut]:
        """The data sets this node registered (offered in its record)."""
        found = await _in_thread(store().datasets)
        return [
            DatasetOut(
                name=d.name,
                format=d.format,
                examples=d.examples,
                feature_shape=list(d.feature_shape),
                classes=d.classes,
                registered=d.registered,
            )
            for d in found
        ]

    # -- jobs ----------------------------------------------------------------------------------

    def list_jobs(db: Store) -> list[JobOut]:
        from ..market.leasebook import LeaseBook

        jobs: dict[str, dict[str, Any]] = {}
        for lease in LeaseBook(db).leases():
            entry = jobs.setdefault(
                lease.job,
                {"job_id": lease.job, "role": lease.role.value, "leases": 0, "lease_states": set()},
            )
            entry["leases"] += 1
            entry["lease_states"].add(lease.state.value)
        trained = {record.job_id: record.state.value for record in db.jobs()}
        for job_id in trained:
            jobs.setdefault(
                job_id, {"job_id": job_id, "role": "peer", "leases": 0, "lease_states": set()}
            )
        return [
            JobOut(
                **{
                    **entry,
                    "lease_states": sorted(entry["lease_states"]),
                    "training": trained.get(job_id),
                }
            )
            for job_id, entry in jobs.items()
        ]

    @app.get("/jobs", dependencies=read, responses=_CONFLICT)
    async def jobs() -> list[JobOut]:
        """The jobs this node bought or worked on, from its store (its leases and training)."""
        listed = await _in_thread(list_jobs, store())
        known = {job.job_id for job in listed}
        if node.market is not None:  # posted, no lease yet
            listed += [
                JobOut(job_id=job_id, role="buyer", leases=0, lease_states=[], training=None)
                for job_id in node.market.jobs
                if job_id not in known
            ]
        return listed

    def job_detail(db: Store, job_id: str) -> JobDetailOut | None:
        from ..market.leasebook import LeaseBook
        from ..market.ledger import Ledger

        leases = LeaseBook(db).leases(job=job_id)
        statement = Ledger(db).statement(job_id)
        rounds = db.rounds(job_id) if db.job(job_id) is not None else []
        handle = None if node.market is None else node.market.jobs.get(job_id)
        if not leases and not rounds and not statement.entries and handle is None:
            return None
        return JobDetailOut(
            job_id=job_id,
            leases=[
                LeaseOut(
                    role=lease.role.value,
                    peer=str(lease.counterpart),
                    price_micro=lease.price,
                    units=lease.units,
                    state=lease.state.value,
                )
                for lease in leases
            ],
            statement=_statement(statement),
            rounds=[{"round": r.round, **r.metrics} for r in rounds],
            events=[] if handle is None else list(handle.events),
        )

    @app.get("/jobs/{job_id}", dependencies=read, responses=_NOT_FOUND | _CONFLICT)
    async def job(job_id: str) -> JobDetailOut:
        """One job: its leases, its statement, the rounds this node trained, the buyer's
        events."""
        found = await _in_thread(job_detail, store(), job_id)
        if found is None:
            raise HTTPException(404, f"no job {job_id!r} at this node")
        return found

    def latest_model(db: Store, job_id: str) -> tuple[ModelOut, bytes] | None:
        from ..training.spec import JobSpec

        record = db.job(job_id)
        checkpoint = None if record is None else db.load_checkpoint(job_id)
        if record is None or checkpoint is None:
            return None
        try:
            training = JobSpec.from_json(record.spec).training
            model, options = training.model, training.model_options
        except ConfigError:  # a spec this version cannot read: the weights are still the job's
            model, options = "", {}
        weights = checkpoint.model.astype("<f4").tobytes()
        out = ModelOut(
            job_id=job_id, round=checkpoint.round, score=checkpoint.score,
            model=model, model_options=options,
            parameters=len(checkpoint.model), sha256=hashlib.sha256(weights).hexdigest(),
        )  # fmt: skip
        return out, weights

    async def found_model(job_id: str) -> tuple[ModelOut, bytes]:
        found = await _in_thread(latest_model, store(), job_id)
        if found is None:
            raise HTTPException(404, f"this node holds no model of job {job_id!r}")
        return found

    @app.get("/jobs/{job_id}/model", dependencies=read, responses=_NOT_FOUND | _CONFLICT)
    async def model(job_id: str) -> ModelOut:
        """The model this node holds for the job (its latest checkpoint): which round, how
        good, how large, its digest."""
        out, _ = await found_model(job_id)
        return out

    @app.get(
        "/jobs/{job_id}/model/weights",
        dependencies=read,
        responses=_NOT_FOUND | _CONFLICT | {200: {"content": {"application/octet-stream": {}}}},
        response_class=Response,
    )
    async def model_weights(job_id: str) -> Response:
        """The parameters of that model: the flat float32 vector, little-endian (its SHA-256
        is ``/jobs/{job_id}/model``'s ``sha256``; ``models.build`` with the job's model and
        options gives the module they load into)."""
        out, weights = await found_model(job_id)
        return Response(
            weights,
            media_type="application/octet-stream",
            headers={
                "Content-Disposition": f'attachment; filename="{_file_name(job_id)}-round'
                f'{out.round}.f32"',
                "X-Meshfed-Sha256": out.sha256,
            },
        )

    @app.get("/jobs/{job_id}/status", dependencies=read, responses=_NOT_FOUND | _CONFLICT)
    async def job_status(job_id: str) -> JobStatusOut:
        """How the job is doing: this node's view if it takes part, else a roster peer's
        (``node.job_status``)."""
        market()
        try:
            report = await node.job_status(job_id)
        except LocalProtocolError as exc:
            raise HTTPException(404, str(exc)) from None
        return JobStatusOut(
            job_id=report.job,
            state=report.state,
            round=report.round,
            rounds=report.rounds,
            accuracy=report.accuracy,
            examples=report.examples,
            roster=[str(p) for p in report.roster],
        )

    @app.post("/jobs", dependencies=write, status_code=202, responses=_CONFLICT | _UNPROCESSABLE)
    async def submit(order: SubmitTraining) -> JobOut:
        """Buy a training job: post it to matching peers; answers once the requests for
        quotes are out (follow it at ``/jobs/{job_id}``)."""
        market()
        try:
            handle = await node.submit_training(
                order.job,
                budget=order.budget,
                tier=order.tier,
                min_peers=order.min_peers,
                max_peers=order.max_peers,
                bid_window_s=order.bid_window_s,
            )
        except (ConfigError, MarketError, ValueError) as exc:
            raise HTTPException(422, str(exc)) from None
        except LocalProtocolError as exc:
            raise HTTPException(409, str(exc)) from None
        return JobOut(job_id=handle.job_id, role="buyer", leases=0, lease_states=[], training=None)

    @app.post("/jobs/{job_id}/cancel", dependencies=write, responses=_NOT_FOUND | _CONFLICT)
    async def cancel(job_id: str) -> JobOut:
        """End a job this node bought: the escrow's rest comes back, every lease settles."""
        handle = market().jobs.get(job_id)
        if handle is None:
            raise HTTPException(404, f"this node bought no job {job_id!r}")
        if handle.buyer.state == "ended":
            raise HTTPException(409, f"job {job_id!r} has ended already")
        try:
            await handle.cancel()
        except MeshfedError as exc:
            raise HTTPException(409, str(exc)) from None
        return JobOut(
            job_id=job_id,
            role="buyer",
            leases=len(handle.buyer.roster),
            lease_states=[],
            training=None,
        )

    # -- money and privacy ---------------------------------------------------------------------

    @app.get("/pricing/estimate", dependencies=read, responses=_CONFLICT | _UNPROCESSABLE)
    async def pricing_estimate(
        kind: Annotated[str, Query(pattern="^(training|inference)$")] = "training",
        tier: Annotated[str, Query(pattern="^(small|medium|large|enterprise)$")] = "small",
        participants: Annotated[int, Query(ge=1, le=1024)] = 1,
        rounds: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    ) -> EstimateOut:
        """What a job would cost, with its breakdown (``node.pricing_estimate``)."""
        market()
        try:
            found = await node.pricing_estimate(kind, tier, participants, rounds)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return EstimateOut(
            total_micro=found.total, per_unit_micro=found.per_unit, breakdown=dict(found.breakdown)
        )

    @app.get("/ledger", dependencies=read, responses=_CONFLICT)
    async def ledger() -> LedgerOut:
        """The node's accounts."""
        return LedgerOut(accounts=await _in_thread(market().ledger.accounts))

    @app.get("/ledger/{job_id}", dependencies=read, responses=_CONFLICT)
    async def statement(job_id: str) -> StatementOut:
        """One job's statement."""
        return _statement(await _in_thread(market().ledger.statement, job_id))

    @app.get("/budget", dependencies=read, responses=_CONFLICT)
    async def budget() -> list[BudgetOut]:
        """The privacy budget of each job this node trained with differential privacy."""
        return await _in_thread(budgets, store())

    @app.get("/audit", dependencies=read, responses=_CONFLICT)
    async def audit(
        kind: Annotated[str | None, Query(max_length=32)] = None,
        after: Annotated[int, Query(ge=0, le=2**62)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    ) -> list[AuditEntryOut]:
        """The audit log, oldest first (``after``: the last ``seq`` seen)."""
        await node.audit_trail.flush()
        found = await _in_thread(AuditLog(store()).entries, kind=kind, after=after, limit=limit)
        return [AuditEntryOut(seq=e.seq, at=e.at, kind=e.kind, fields=e.fields) for e in found]

    return app
