"""kltune.functional stays light: importing it must not pull in transformers."""

import subprocess
import sys


def test_importing_functional_does_not_import_transformers():
    # A fresh interpreter: this test process has long imported everything.
    code = (
        "import sys\n"
        "import kltune.functional as KF\n"
        "assert callable(KF.kl_k3)\n"
        "print('transformers' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", (
        "import kltune.functional imported transformers; the functional core (and the "
        "package __init__ it runs first) must not depend on model libraries"
    )
