"""The market's ledger: double entry that sums to zero, idempotent, sealed and durable."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshfed.errors import BudgetExceeded, CorruptRecord, LocalProtocolError, StoreError
from meshfed.identity import PeerId
from meshfed.market.ledger import (
    AVAILABLE,
    MINT,
    Debit,
    EntryKind,
    Ledger,
    earned_account,
    escrow_account,
    forfeited_account,
    paid_account,
    sold_account,
)
from meshfed.market.terms import MAX_AMOUNT
from meshfed.store import Store

PEERS = [PeerId.from_public_key(bytes([i]) * 32) for i in range(4)]
SELLER, OTHER, BUYER, _ = PEERS
KEY = bytes(range(32))


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Store.open(tmp_path / "node.sqlite3", key=KEY) as store:
        yield Ledger(store, clock=lambda: 1000.0)


def test_a_buyer_escrows_pays_per_acknowledged_unit_and_gets_the_rest_back(
    ledger: Ledger,
) -> None:
    ledger.grant(100, key="welcome", memo="testnet grant")
    ledger.escrow("job", 60, key="job/escrow")
    assert ledger.balance(AVAILABLE) == 40 and ledger.balance(escrow_account("job")) == 60
    assert ledger.pay("job", SELLER, 0, 10, evidence=b"note 0")
    assert ledger.pay("job", OTHER, 0, 10, evidence=b"note 0'")
    assert ledger.pay("job", SELLER, 1, 10, evidence=b"note 1")
    assert ledger.release("job", key="job/settle") == 30
    assert ledger.accounts() == {
        MINT: -100,
        AVAILABLE: 70,
        escrow_account("job"): 0,
        paid_account("job", SELLER): 20,
        paid_account("job", OTHER): 10,
    }
    statement = ledger.statement("job")
    assert (statement.escrowed, statement.released, statement.escrow) == (60, 30, 0)
    assert statement.paid == {SELLER: 20, OTHER: 10}
    assert [e.kind for e in statement.entries] == [
        EntryKind.ESCROW,
        EntryKind.PAY,
        EntryKind.PAY,
        EntryKind.PAY,
        EntryKind.RELEASE,
    ]
    pay = statement.entries[1]
    assert (pay.counterpart, pay.unit, pay.amount, pay.evidence) == (SELLER, 0, 10, b"note 0")
    assert all(sum(p.amount for p in e.postings) == 0 for e in statement.entries)
    assert ledger.verify() == []


def test_nobody_is_charged_beyond_the_budget(ledger: Ledger) -> None:
    ledger.grant(50, key="g")
    with pytest.raises(BudgetExceeded, match=r"cannot escrow 0\.00006 credits, 0\.00005"):
        ledger.escrow("job", 60, key="e")
    ledger.escrow("job", 25, key="e")
    assert ledger.pay("job", SELLER, 0, 20, evidence=b"note")
    with pytest.raises(BudgetExceeded, match=r"exceeds the 0\.000005 credits left"):
        ledger.pay("job", SELLER, 1, 6, evidence=b"note")
    assert ledger.balance(escrow_account("job")) == 5  # the refused debit wrote nothing
    assert ledger.statement("job").paid == {SELLER: 20}
    assert ledger.entry(f"pay:job:{SELLER.raw.hex()}:1") is None
    assert ledger.release("job", key="r") == 5
    with pytest.raises(BudgetExceeded):  # released: the job pays nothing more
        ledger.pay("job", SELLER, 1, 1, evidence=b"note")


def test_a_round_of_debits_is_paid_in_one_transaction_all_or_nothing(ledger: Ledger) -> None:
    ledger.grant(100, key="g")
    ledger.escrow("job", 30, key="e")
    first = [Debit("job", peer, 0, 10, b"note") for peer in (SELLER, OTHER)]
    assert ledger.pay_many([*first, first[0]]) == [True, True, False]
    assert ledger.pay_many(first) == [False, False]
    second = [Debit("job", peer, 1, 10, b"note") for peer in (SELLER, OTHER)]
    before = ledger.accounts()
    with pytest.raises(BudgetExceeded, match="unit 1 of"):
        ledger.pay_many(second)  # the second does not fit: neither is paid
    with pytest.raises(ValueError):
        ledger.pay_many([second[0], Debit("job", OTHER, 1, 10, b"")])
    assert ledger.accounts() == before
    assert ledger.pay_many(second[:1]) == [True] and ledger.pay_many([]) == []
    assert ledger.statement("job").paid == {SELLER: 20, OTHER: 10}


def test_every_key_applies_once_and_a_reused_key_is_refused(ledger: Ledger) -> None:
    for _ in range(3):
        ledger.grant(100, key="g")
        ledger.escrow("job", 40, key="e")
    assert ledger.balance(AVAILABLE) == 60
    assert ledger.pay("job", SELLER, 7, 10, evidence=b"first")
    assert not ledger.pay("job", SELLER, 7, 10, evidence=b"a replayed note")
    entry = ledger.entry(f"pay:job:{SELLER.raw.hex()}:7")
    assert entry is not None and entry.evidence == b"first"  # the first result stands
    assert ledger.release("job", key="r") == 30
    ledger.escrow("job", 10, key="e2")  # a top-up after the release ...
    assert ledger.release("job", key="r") == 30  # ... is not released by a repeat
    assert ledger.balance(escrow_account("job")) == 10
    with pytest.raises(LocalProtocolError, match="another transaction"):
        ledger.pay("job", SELLER, 7, 11, evidence=b"note")  # the same unit, another amount
    with pytest.raises(LocalProtocolError, match="another transaction"):
        ledger.escrow("other job", 40, key="e")
    with pytest.raises(LocalProtocolError, match="another transaction"):
        ledger.grant(99, key="g")
    assert ledger.balance(MINT) == -100 and ledger.verify() == []


@pytest.mark.parametrize(
    "call",
    [
        lambda books: books.grant(0, key="k"),
        lambda books: books.grant(MAX_AMOUNT + 1, key="k"),
        lambda books: books.grant(1.5, key="k"),
        lambda books: books.grant(True, key="k"),
        lambda books: books.grant(1, key=""),
        lambda books: books.escrow("", 1, key="k"),
        lambda books: books.escrow("j" * 129, 1, key="k"),
        lambda books: books.pay("job", SELLER, -1, 1, evidence=b"note"),
        lambda books: books.pay("job", SELLER, 0, -5, evidence=b"note"),
        lambda books: books.pay("job", SELLER, 0, 5, evidence=b""),
        lambda books: books.earn("job", BUYER, 0, 5, evidence=b""),
        lambda books: books.forfeit("job", BUYER, 0, 5, evidence=b""),
        lambda books: books.earn("job", BUYER, 0, 1, evidence=b"x" * (64 * 1024 + 1)),
        lambda books: books.grant(1, key="k", memo="m" * 257),
    ],
)
def test_malformed_arguments_are_refused_before_anything_is_written(
    ledger: Ledger, call: Callable[[Ledger], object]
) -> None:
    with pytest.raises(ValueError):
        call(ledger)
    assert ledger.accounts() == {}


def test_no_account_grows_beyond_the_largest_amount(ledger: Ledger) -> None:
    ledger.grant(MAX_AMOUNT, key="a")
    with pytest.raises(BudgetExceeded, match="largest amount"):
        ledger.grant(1, key="b")
    assert ledger.accounts() == {MINT: -MAX_AMOUNT, AVAILABLE: MAX_AMOUNT}


def test_a_seller_earns_per_acknowledged_unit_and_forfeits_follow_the_acks(
    ledger: Ledger,
) -> None:
    assert ledger.earn("job", BUYER, 0, 10, evidence=b"ack 0")
    assert not ledger.earn("job", BUYER, 0, 10, evidence=b"ack 0 again")
    # the buyer never came back for units 1 and 2: the seller records them as forfeited
    assert ledger.forfeit("job", BUYER, 1, 10, evidence=b"award + note 1")
    assert ledger.forfeit("job", BUYER, 2, 10, evidence=b"award + note 2")
    assert not ledger.forfeit("job", BUYER, 0, 10, evidence=b"note")  # acknowledged already
    assert not ledger.forfeit("job", BUYER, 1, 10, evidence=b"note")
    statement = ledger.statement("job")
    assert statement.earned == {BUYER: 10} and statement.forfeited == {BUYER: 20}
    # ... and it came back after all: its acknowledgement turns a forfeit into earnings
    assert ledger.earn("job", BUYER, 1, 10, evidence=b"ack 1")
    statement = ledger.statement("job")
    assert statement.earned == {BUYER: 20} and statement.forfeited == {BUYER: 10}
    assert ledger.balance(sold_account("job", BUYER)) == -30
    assert ledger.balance(earned_account("job", BUYER)) == 20
    assert ledger.balance(forfeited_account("job", BUYER)) == 10
    assert ledger.verify() == []


def test_both_ledgers_agree_to_the_last_unit(tmp_path: Path) -> None:
    """The buyer pays and the seller earns the same acknowledged (job, unit, amount)s, in
    whatever order, with duplicates, and a late buyer's forfeits turned into earnings."""
    with Store.open(tmp_path / "buyer.sqlite3") as b, Store.open(tmp_path / "seller.sqlite3") as s:
        buyer, seller = Ledger(b), Ledger(s)
        buyer.grant(10_000, key="g")
        buyer.escrow("job", 1_000, key="e")
        units = [(u, 7 + u % 3) for u in range(40)]
        for unit, amount in units:
            buyer.pay("job", SELLER, unit, amount, evidence=b"note")
        for unit, amount in units[30:]:
            seller.forfeit("job", BUYER, unit, amount, evidence=b"award")
        for unit, amount in reversed(units + units[:5]):
            seller.earn("job", BUYER, unit, amount, evidence=b"ack")
        paid = buyer.statement("job").paid[SELLER]
        assert paid == seller.statement("job").earned[BUYER] == sum(a for _, a in units)
        assert seller.statement("job").forfeited == {}
        assert buyer.release("job", key="settle") == 1_000 - paid


# -- hypothesis: any sequence of operations --------------------------------------------------

JOBS = ("a", "b")
AMOUNT_OF_UNIT = [1 + (unit * 7919) % 23 for unit in range(6)]


@dataclass(frozen=True)
class Op:
    """One ledger call; its amount is a function of its key, so a repeat is the same request."""

    name: str
    job: str = "a"
    peer: int = 0
    number: int = 0  # the unit, or which idempotency key

    def apply(self, ledger: Ledger) -> int | bool | None:
        job, peer, number = self.job, PEERS[self.peer], self.number
        if self.name == "grant":
            ledger.grant(10 + 20 * number, key=f"g{number}")
            return None
        if self.name == "escrow":
            ledger.escrow(job, 5 + 7 * number, key=f"e{job}{number}")
            return None
        if self.name == "release":
            return ledger.release(job, key=f"r{job}{number % 2}")
        method = {"pay": ledger.pay, "earn": ledger.earn, "forfeit": ledger.forfeit}[self.name]
        return method(job, peer, number, AMOUNT_OF_UNIT[number], evidence=self.name.encode())


operations = st.builds(
    Op,
    st.sampled_from(["grant", "escrow", "pay", "release", "earn", "forfeit"]),
    st.sampled_from(JOBS),
    st.integers(0, 2),
    st.integers(0, 5),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operations, max_size=30))
def test_any_sequence_of_operations_keeps_the_books_balanced(ops: list[Op]) -> None:
    with tempfile.TemporaryDirectory() as directory, Store.open(Path(directory) / "s") as store:
        ledger = Ledger(store)
        applied: dict[str, dict[tuple[str, PeerId], int]] = {"pay": {}, "earn": {}}
        for op in ops:
            before = ledger.accounts()
            try:
                result = op.apply(ledger)
            except BudgetExceeded:
                assert ledger.accounts() == before  # a refusal writes nothing
                continue
            if result is True and op.name in applied:
                totals, key = applied[op.name], (op.job, PEERS[op.peer])
                totals[key] = totals.get(key, 0) + AMOUNT_OF_UNIT[op.number]
            after = ledger.accounts()
            assert sum(after.values()) == 0
            assert all(after[a] >= 0 for a in after if a.startswith(("escrow:", AVAILABLE)))
            repeated = op.apply(ledger)
            assert repeated == result if op.name == "release" else repeated in (None, False)
            assert ledger.accounts() == after  # a repeat changes nothing
        assert ledger.verify() == []
        for entry in ledger.entries():
            assert len(entry.postings) >= 2 and sum(p.amount for p in entry.postings) == 0
        for job in JOBS:
            statement = ledger.statement(job)
            for side, name in ((statement.paid, "pay"), (statement.earned, "earn")):
                assert dict(side) == {p: v for (j, p), v in applied[name].items() if j == job}
            assert statement.escrow == statement.escrowed - statement.released - sum(
                statement.paid.values()
            )


DEBITS = [
    Op(name, "a", peer, unit)
    for name in ("pay", "earn", "forfeit")
    for peer in range(2)
    for unit in range(0, 6, 1 if name != "forfeit" else 2)
]


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.permutations(DEBITS + DEBITS[::3]))
def test_reordering_and_duplicating_debits_ends_in_the_same_books(ops: list[Op]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        books: list[dict[str, int]] = []
        for order in (DEBITS, ops):
            with Store.open(Path(directory) / f"{len(books)}") as store:
                ledger = Ledger(store)
                ledger.grant(1_000, key="g")
                ledger.escrow("a", 1_000, key="e")
                for op in order:
                    op.apply(ledger)
                books.append({a: v for a, v in ledger.accounts().items() if v})
        assert books[0] == books[1]


# -- tampering -------------------------------------------------------------------------------


def _tamper(path: Path, statement: str, *parameters: object) -> None:
    connection = sqlite3.connect(path)
    connection.execute(statement, parameters)
    connection.commit()
    connection.close()


def test_a_tampered_entry_or_balance_is_detected_and_never_used(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite3"
    with Store.open(path, key=KEY) as store:
        ledger = Ledger(store)
        ledger.grant(100, key="g")
        ledger.escrow("job", 50, key="e")
        for unit in range(3):
            ledger.pay("job", SELLER, unit, 10, evidence=b"note")
    # a local writer without the key lowers what unit 1 cost and raises the escrow
    _tamper(path, "UPDATE ledger_entries SET amount = 1 WHERE unit = 1")
    _tamper(path, "UPDATE ledger_balances SET balance = 50 WHERE account = 'escrow:job'")
    with Store.open(path, key=KEY) as store:
        ledger = Ledger(store)
        with pytest.raises(CorruptRecord, match=r"ledger entry 4 \(pay:job:.*:1\)"):
            ledger.entry(f"pay:job:{SELLER.raw.hex()}:1")
        with pytest.raises(CorruptRecord):
            ledger.statement("job")
        with pytest.raises(CorruptRecord, match="ledger account 'escrow:job'"):
            ledger.balance(escrow_account("job"))
        with pytest.raises(CorruptRecord, match="escrow:job"):
            ledger.pay("job", SELLER, 3, 10, evidence=b"note")  # never paid from a forged balance
        with pytest.raises(CorruptRecord):
            ledger.pay("job", SELLER, 1, 1, evidence=b"note")  # nor a repeat matched on it
        problems = ledger.verify()
    forged = [p for p in problems if "HMAC" in p]
    assert len(forged) == 2 and "entry 4" in forged[0] and "'escrow:job'" in forged[1]


def test_an_entry_removed_from_the_middle_of_the_ledger_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite3"
    with Store.open(path, key=KEY) as store:
        ledger = Ledger(store)
        ledger.grant(100, key="g")
        ledger.escrow("job", 50, key="e")
        for unit in range(3):
            ledger.pay("job", SELLER, unit, 10, evidence=b"note")
    _tamper(path, "DELETE FROM ledger_entries WHERE unit = 1")
    with Store.open(path, key=KEY) as store:
        problems = Ledger(store).verify()
    assert "ledger entry 5: the entry before it was changed or removed" in problems
    assert any("escrow:job" in p and "postings" in p for p in problems)


def test_a_read_only_store_answers_statements_and_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite3"
    with Store.open(path) as store:
        writer = Ledger(store)
        writer.grant(5, key="g")
        writer.escrow("job", 5, key="e")
        with Store.open(path, readonly=True) as reading:
            reader = Ledger(reading)
            assert reader.statement("job").escrowed == 5
            with pytest.raises(StoreError, match="read-only"):
                reader.pay("job", SELLER, 0, 1, evidence=b"note")
            writer.pay("job", SELLER, 0, 1, evidence=b"note")
            assert reader.statement("job").paid == {SELLER: 1}  # sees the writer's commits


# -- kill -9 ---------------------------------------------------------------------------------

_WRITER = """
import sys
from meshfed.identity import PeerId
from meshfed.market.ledger import Ledger
from meshfed.store import Store
seller, buyer = PeerId.from_public_key(bytes(32)), PeerId.from_public_key(bytes([2]) * 32)
ledger = Ledger(Store.open(sys.argv[1]))
ledger.grant(10**12, key="grant")
ledger.escrow("job", 10**9, key="escrow")
unit = int(sys.argv[2])
while True:
    ledger.pay("job", seller, unit, 1 + unit % 7, evidence=b"note")
    ledger.earn("job", buyer, unit, 1 + unit % 7, evidence=b"ack")
    print(unit, flush=True)
    unit += 1
"""


def test_kill_9_at_any_moment_loses_no_debit_that_was_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite3"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    acknowledged = -1
    for run, lines in enumerate((5, 17, 3, 29, 11)):
        start = max(acknowledged - 2, 0)  # the restarted writer repeats the last units
        process = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), str(start)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert process.stdout is not None
        for _, line in zip(range(lines), process.stdout, strict=False):
            acknowledged = int(line)
        os.kill(process.pid, signal.SIGKILL)  # most likely between a pay and its earn
        process.wait()
        process.stdout.close()
        with Store.open(path) as store:
            ledger = Ledger(store)
            assert ledger.verify() == [], run
            accounts = ledger.accounts()
            assert sum(accounts.values()) == 0
            statement = ledger.statement("job")
            paid_units = sorted(e.unit or 0 for e in statement.entries if e.kind is EntryKind.PAY)
            earned_units = sorted(
                e.unit or 0 for e in statement.entries if e.kind is EntryKind.EARN
            )
            assert paid_units == list(range(len(paid_units)))  # no hole, no duplicate
            assert earned_units == list(range(len(earned_units)))
            assert len(earned_units) >= acknowledged + 1
            assert len(paid_units) - len(earned_units) in (0, 1)
            assert statement.paid[SELLER] == sum(1 + u % 7 for u in paid_units)
            assert statement.escrow == 10**9 - statement.paid[SELLER]
            assert not ledger.pay(
                "job", SELLER, acknowledged, 1 + acknowledged % 7, evidence=b"note"
            )
            assert accounts[MINT] == -(10**12)  # the grant, once over all restarts
