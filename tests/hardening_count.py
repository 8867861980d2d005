"""Run the bad-input table once and print its counts (cases, tracebacks,
wrong exit codes): ``PYTHONPATH=. python3 tests/hardening_count.py``."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import test_hardening_inputs as t


def main() -> int:
    cases = tracebacks = wrong = 0
    for case in t.CASES:
        if case.root and not t.IS_ROOT:
            continue
        with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
            d = Path(tmp)
            if case.ro:
                stack.enter_context(t._ro_mount(d))
            if case.tmpfs:
                stack.enter_context(t._tmpfs(d))
            try:
                argv = case.setup(d)
            except BaseException as e:
                print(f"skip  {case.name}: {e}")
                continue
            cases += 1
            try:
                proc = t.run(argv, d, env=case.env)
                code, err = proc.returncode, proc.stderr.decode(errors="replace")
            except subprocess.TimeoutExpired:
                code, err = "timeout", ""
            tb = "Traceback" in err
            bad = code != case.code
            extra = ""
            if case.check is not None and not bad and code != "timeout":
                try:
                    case.check(d, proc)
                except BaseException as e:
                    bad, extra = True, f" check failed: {e}"
            tracebacks += tb
            wrong += bad
            mark = "TB  " if tb else "BAD " if bad else "ok  "
            print(f"{mark}{case.name}: exit {code} (want {case.code}){extra}")
    print(f"{cases} cases, {tracebacks} tracebacks, {wrong} wrong exit codes or checks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
