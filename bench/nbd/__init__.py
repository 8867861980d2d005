"""NBD front ends (issue 9): ``blockmirror serve`` against ``nbdkit file`` and
``qemu-nbd`` under the same fio jobs (``harness.py``), and the servers'
start-and-stop shared with the convergence harness's ``--frontend nbd``
(``servers.py``). ``blockmirror bench nbd --help`` or ``python -m bench.nbd``.
"""
