"""The core install: a node without the ``train`` extra (no torch, scikit-learn or
dp-accounting) starts, listens and serves its API, never loads training, neither offers nor
is asked to train, and refuses training work naming the extra. The last test builds the wheel
and installs it into a fresh virtual environment with the core dependencies alone (from the
package index, pinned by constraints.txt), as an edge box would."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from meshfed.api.views import budgets
from meshfed.errors import ConfigError, NoMatchingPeers
from meshfed.identity import _KEY_FILE
from meshfed.market.matching import unmet
from meshfed.market.messages import DeclineReason
from meshfed.market.order import spec_from
from meshfed.market.terms import Requirements, Tier, WorkKind
from meshfed.node import Node, open_node
from meshfed.store import Store
from meshfed.testing import free_port, quiet_config
from meshfed.training import extra
from meshfed.transports.memory import MemoryNetwork
from tests.market.mesh import meshed
from tests.procs.harness import ROOT

TRAINING = ("torch", "sklearn", "dp_accounting")
#: ``meshfed-node`` in an interpreter where the training modules cannot be imported or found,
#: as in an install without the extra (a stray import fails instead of loading them)
CORE_CLI = (
    "import sys\n"
    f"for name in {TRAINING!r}:\n"
    "    sys.modules[name] = None\n"
    "from meshfed.cli import main\n"
    "sys.argv[0] = 'meshfed-node'\n"
    "main()\n"
)
JOB = 'job_id = "edge"\nrounds = 2\ndataset = "digits"\n'
#: ``POST /jobs`` to the node of a data directory: prints the refusal's status and detail
POST_JOB = (
    "import json, sys\n"
    "from pathlib import Path\n"
    "from meshfed.api.client import ApiClient, ApiError\n"
    "try:\n"
    "    ApiClient(Path(sys.argv[1])).post('/jobs', json.loads(sys.argv[2]))\n"
    "except ApiError as refused:\n"
    "    print(refused.status, refused)\n"
)


def core_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CORE_CLI, *args], capture_output=True, text=True, timeout=120,
        cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def test_the_core_node_s_modules_load_no_training() -> None:
    core = [
        "meshfed", "meshfed.node", "meshfed.cli", "meshfed.market.driver", "meshfed.api.app",
        "meshfed.api.service", "meshfed.onion.service", "meshfed.membership.service",
        "meshfed.secagg.driver", "meshfed.data.registry", "meshfed.device.service",
    ]  # fmt: skip
    code = (
        f"import importlib, sys\nfor name in {core!r}:\n    importlib.import_module(name)\n"
        "print(sorted({'torch', 'sklearn', 'dp_accounting', 'scipy'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


async def test_a_node_without_training_offers_none_and_is_never_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    network = MemoryNetwork()
    config = {"membership": True, "gossip_interval_s": 0.1, "market_capacity": 1}
    async with AsyncExitStack() as stack:

        async def start(name: str) -> Node:
            return await stack.enter_async_context(
                open_node(quiet_config(tmp_path / name, **config), network=network)
            )

        buyer = await start("buyer")
        trainer = await start("trainer")
        with monkeypatch.context() as installed:
            installed.setattr(extra, "TRAIN_MODULES", ("meshfed_not_installed",))
            core = await start("core")
        await meshed([buyer, trainer, core])
        [record] = [r for r in buyer.peers() if r.peer == core.peer_id]
        caps = record.capabilities
        assert "trainer" not in caps.roles
        assert {a.kind for a in caps.prices} == {WorkKind.INFERENCE.value}  # it still sells
        assert unmet(Requirements(), caps, kind=WorkKind.TRAINING, tier=Tier.SMALL) == (
            DeclineReason.KIND  # what its own book answers an RFQ for training with
        )
        trainer_caps = next(r for r in buyer.peers() if r.peer == trainer.peer_id).capabilities
        assert "trainer" in trainer_caps.roles
        with pytest.raises(NoMatchingPeers) as caught:
            await buyer.submit_training(
                {"job_id": "edge", "rounds": 2, "dataset": "digits", "secure": False},
                budget=5, min_peers=2, requirements=Requirements(dataset=""),
            )  # fmt: skip
        assert caught.value.excluded == {"kind": 1}  # the core node, and only it


def test_a_training_order_without_training_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(extra, "TRAIN_MODULES", ("torch", "meshfed_not_installed"))
    with pytest.raises(
        ConfigError, match=r"no meshfed_not_installed\): pip install 'meshfed\[train\]'"
    ):
        spec_from(b'{"job_id": "edge", "dataset": "digits"}', ["a", "b"])


def test_a_budget_this_install_cannot_read_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshfed.privacy.accountant import GaussianEvent, PrivacyAccountant

    accountant = PrivacyAccountant(budget_epsilon=4.0, delta=1e-5)
    accountant.charge(0, GaussianEvent(noise_multiplier=1.0))
    with Store.open(tmp_path / "store.db", key=bytes(32)) as store:
        store.put_job("dp", "{}")
        store.commit_privacy("dp", accountant.state_dict())
        [shown] = budgets(store)  # with the train extra
        assert shown.job_id == "dp" and shown.spent_epsilon > 0
        monkeypatch.setitem(sys.modules, "dp_accounting", None)  # a core install's
        monkeypatch.delitem(sys.modules, "meshfed.privacy.accountant")
        assert budgets(store) == []  # not an ImportError: the live view reads it on every node


def test_a_core_node_refuses_a_job_file_a_testnet_and_an_order(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(JOB)
    data_dir = str(tmp_path / "node")
    for args in (
        ("run", "--job", "job.toml", "--data-dir", data_dir),
        ("testnet", "--nodes", "2"),
        ("submit", "training", "job.toml", "--budget", "5", "--data-dir", data_dir),
    ):
        result = core_cli(*args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert "needs training" in result.stderr, args
        assert "pip install 'meshfed[train]'" in result.stderr, args
        assert "Traceback" not in result.stderr, args
    assert not (tmp_path / "node" / _KEY_FILE).exists()  # refused before the node started


def _build_wheel(into: Path) -> Path:
    """meshfed's wheel, built from a copy of the tree (the build writes beside its sources)."""
    source = into / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(  # meshfed/transports is a link: copied as files
        ROOT / "meshfed", source / "meshfed", ignore=shutil.ignore_patterns("__pycache__")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(into), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    [wheel] = into.glob("meshfed-*.whl")
    return wheel


#: the interpreters the wheel is tried with: this one, and any in EDGE_PYTHONS
#: (paths, space-separated: another Python version, say)
PYTHONS = [sys.executable, *os.environ.get("EDGE_PYTHONS", "").split()]


@pytest.mark.slow  # ~25-30 s here: the install is most of it (compiling fastecdsa the first time)
@pytest.mark.parametrize("interpreter", PYTHONS)
def test_the_wheel_installs_and_serves_without_training(tmp_path: Path, interpreter: str) -> None:
    wheel = _build_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([interpreter, "-m", "venv", "--without-pip", str(venv)], check=True)
    python, cli = venv / "bin" / "python", str(venv / "bin" / "meshfed-node")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the venv's own meshfed
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
         "--disable-pip-version-check", "-c", str(ROOT / "constraints.txt"), str(wheel)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    found = subprocess.run(
        [str(python), "-c", f"import importlib.util as u; print([n for n in {TRAINING!r} "
         "if u.find_spec(n)], u.find_spec('meshfed').origin)"],
        capture_output=True, text=True, check=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert found.stdout.startswith(f"[] {venv}"), found.stdout  # no training; our wheel

    data_dir, port = tmp_path / "node", free_port()
    node = subprocess.Popen(
        [cli, "run", "--json", "--no-mdns", "--data-dir", str(data_dir),
         "--listen", f"/ip4/127.0.0.1/tcp/{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    try:
        assert node.stdout is not None
        line = node.stdout.readline()
        if not line.startswith("{"):
            node.kill()
            pytest.fail(f"no started line: {line!r}; {node.communicate()[1]}")
        started = json.loads(line)
        assert started["event"] == "started" and started["api"], started
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # it listens
        status = subprocess.run(
            [cli, "status", "--json", "--data-dir", str(data_dir)],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        answer = json.loads(status.stdout)
        assert answer["peer_id"] == started["peer_id"] and answer["market"] is True
        order = {"job": {"job_id": "edge", "dataset": "digits"}, "budget": 5}
        posted = subprocess.run(  # training work over the REST API: a 422 that names the extra
            [str(python), "-c", POST_JOB, str(data_dir), json.dumps(order)],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert posted.returncode == 0, posted.stderr
        assert posted.stdout.startswith("422 a training job needs training"), posted.stdout
        assert "pip install 'meshfed[train]'" in posted.stdout
        (tmp_path / "job.toml").write_text(JOB)
        refused = subprocess.run(
            [cli, "run", "--job", "job.toml", "--data-dir", str(tmp_path / "other")],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
        )  # fmt: skip
        assert refused.returncode == 2, refused.stderr
        assert "needs training" in refused.stderr and "meshfed[train]" in refused.stderr
    finally:
        node.send_signal(signal.SIGTERM)
        out, err = node.communicate(timeout=30)
    assert node.returncode == 0, err
    assert json.loads(out.splitlines()[-1])["event"] == "stopped"
    assert "not offering the trainer role" in err  # said once, at start
