"""omni_train/compat/: the patches apply once, each names an upstream target that exists in the installed
library, and a library at a version no patch was written for stops the run (or warns, when allowed)."""

import pytest
import torch

from omni_train import compat
from omni_train.compat import registry

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_apply_all_is_idempotent(library_patches):
    from megatron.core.transformer import attention

    from omni_train.compat.megatron_rotary import apply_rotary_pos_emb

    assert attention.apply_rotary_pos_emb is apply_rotary_pos_emb
    assert compat.apply_all(DEVICE) == []  # the fixture applied them: nothing left to do
    assert attention.apply_rotary_pos_emb is apply_rotary_pos_emb
    with pytest.raises(ValueError, match="device_type"):
        compat.apply_all("gpu")


def test_registry_names_each_patch_and_an_existing_upstream_target(library_patches):
    patches = compat.all_patches()
    names = [p.name for p in patches]
    assert len(names) == len(set(names))
    assert {"cpu_torch_view", "router_gemm_without_te", "fused_rotary", "tower_varlen_attention",
            "checkpoint_restricted_unpickling"} <= set(names)
    for patch in patches:
        assert patch.library in ("megatron-core", "torch", "transformers") and patch.why and patch.targets
        assert any(registry.version_matches(registry.installed_version(patch.library), v)
                   for v in patch.written_for)
        for target in patch.targets:
            prefix = target.split(".")[0]
            assert prefix == {"megatron-core": "megatron"}.get(patch.library, patch.library), target
            registry.resolve(target)  # AttributeError / ImportError when upstream renamed it


def test_torch_is_checked_at_major_minor():
    assert registry.version_matches("2.13.0+cpu", "2.13")
    assert registry.version_matches("2.13.2+cu128", "2.13")
    assert not registry.version_matches("2.14.0", "2.13")
    assert not registry.version_matches("2.1.3", "2.13")
    assert not registry.version_matches("0.16.2", "0.16.1")


def _fake_megatron(version):
    real = registry.installed_version
    return lambda library: version if library == "megatron-core" else real(library)


def test_untested_version_fails_naming_library_versions_and_patch(monkeypatch):
    monkeypatch.delenv(registry.ALLOW_UNTESTED, raising=False)
    monkeypatch.setattr(registry, "installed_version", _fake_megatron("0.17.0"))
    with pytest.raises(compat.UntestedVersionError) as error:
        compat.check_versions(compat.all_patches())
    message = str(error.value)
    assert "megatron-core 0.17.0 is installed" in message
    assert "patch 'fused_rotary' (replaces megatron.core.transformer.attention.apply_rotary_pos_emb)" in message
    assert "written for megatron-core 0.16.1" in message
    assert registry.ALLOW_UNTESTED in message
    assert "transformers" not in message  # only the mismatching library
    monkeypatch.setattr(compat, "_APPLIED", set())  # a fresh process: apply_all checks before patching
    with pytest.raises(compat.UntestedVersionError, match="megatron-core 0.17.0"):
        compat.apply_all(DEVICE)


def test_escape_hatch_turns_the_failure_into_a_warning(monkeypatch):
    monkeypatch.setenv(registry.ALLOW_UNTESTED, "1")
    monkeypatch.setattr(registry, "installed_version", _fake_megatron("0.17.0"))
    with pytest.warns(compat.UntestedVersionWarning, match="megatron-core 0.17.0 is installed"):
        compat.check_versions(compat.all_patches())


def test_importing_compat_imports_no_library():
    import subprocess
    import sys

    code = ("import sys, omni_train.compat as c; c.quiet_library_warnings(); "
            "print(sorted(m for m in ('torch', 'megatron', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_docs_table_lists_every_patch():
    from pathlib import Path

    table = (Path(__file__).resolve().parents[2] / "docs" / "compat.md").read_text()
    missing = [p.name for p in compat.all_patches() if f"| `{p.name}` (" not in table]
    assert not missing, f"docs/compat.md lacks {missing}"
