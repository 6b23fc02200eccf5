"""The native extension is built, reports how, and the package degrades cleanly without it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from layerskip_ext import _native, ops


def test_native_extension_is_built():
    assert _native.native_available(), _native.load_error()
    assert ops.native_available()
    for name in ("rms_norm", "rope", "kv_cache_write", "cache_attention"):
        assert hasattr(torch.ops.layerskip, name)


def test_build_info_fields():
    info = _native.build_info()
    for key in ("native", "version", "torch", "cuda_compiled", "cuda_archs", "cpu_isa", "cpu_features",
                "max_head_dim", "torch_runtime", "cuda_available"):
        assert key in info, key
    assert info["native"] is True
    assert isinstance(info["cuda_compiled"], bool)
    assert isinstance(info["cuda_archs"], list)
    assert info["cpu_isa"] in ("avx512", "avx2", "generic")
    assert set(info["cpu_features"]) >= {"avx512f", "avx512bf16", "avx2", "fma"}
    assert info["max_head_dim"] == 256
    assert info["cuda_available"] == torch.cuda.is_available()
    import layerskip_ext

    assert info["version"] == layerskip_ext.__version__
    # Built against the torch that runs it (same release; local suffixes like +cu130 may be absent at run time).
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    if info["cuda_compiled"]:
        assert info["cuda_archs"], "a CUDA build records its archs"


def test_cuda_compiled_when_expected():
    expect = os.environ.get("LAYERSKIP_EXPECT_CUDA")
    info = _native.build_info()
    if expect == "1":
        assert info["cuda_compiled"], "LAYERSKIP_EXPECT_CUDA=1 but the extension was built without CUDA"
    elif expect == "0":
        assert not info["cuda_compiled"], "LAYERSKIP_EXPECT_CUDA=0 but the extension was built with CUDA"


def test_package_works_without_native_extension():
    """A source checkout that was never built: package imports, references work, native ops explain themselves."""
    code = textwrap.dedent("""
        import sys
        sys.modules["layerskip_ext._C"] = None  # as if _C had never been built
        import torch
        from layerskip_ext import ops, _native
        assert not ops.native_available()
        x, w = torch.randn(2, 8), torch.ones(8)
        ops.rms_norm_reference(x, w, 1e-5)
        info = _native.build_info()
        assert info["native"] is False and info["cuda_compiled"] is False
        try:
            ops.rms_norm(x, w, 1e-5)
        except RuntimeError as e:
            assert "layerskip_ext native extension is not built: pip install" in str(e), str(e)
        else:
            raise AssertionError("no error")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr
