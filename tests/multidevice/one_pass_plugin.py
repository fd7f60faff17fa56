"""pytest plugin: run the cases with the one-pass reduction used on accelerators.

The CPU backend normally takes the shifted-sums path; ``-p one_pass_plugin``
(with this folder on ``sys.path``) switches to the accelerator path so that its
cross-device combination is tested without an accelerator. The switch happens
in a hook, not on import (doctest collection imports this module).
"""

import jxent._kernels


def pytest_configure(config):
    del config
    jxent._kernels._ONE_PASS = True
