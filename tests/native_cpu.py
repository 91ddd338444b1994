"""The mark for tests of the native CPU kernels: they run where the CPU has the units the kernels need
(model/kernels/native.py's cpu_supported); elsewhere kvserve runs torch's kernels and so do its tests."""
import pytest

from model.kernels import native

needs_native = pytest.mark.skipif(not native.cpu_supported(),
                                  reason="this CPU lacks the AVX-512 units the native kernels need")
