"""Convergence versus write rate (issue 4): a matrix runner, the analytical
pre-copy model, plots, and QEMU's block mirror as the peer.

Run it with ``blockmirror bench convergence --help`` (a thin entry to
:func:`harness.main`), or from Python::

    from bench.convergence.harness import MatrixConfig, run_matrix
    result = run_matrix(MatrixConfig(image_size=64 << 20, rates=[0, 8 << 20]))

The modules are named without a ``test_`` prefix so that ``python -m pytest
bench`` (the pytest-benchmark micro suite) never collects them.
"""
