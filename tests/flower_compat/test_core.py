"""The compat core: version range, signature checks, patches undone, stock fallback said once."""

from __future__ import annotations

import logging
import types

import pytest

import pollinate.flower_compat as fc


def _module() -> types.ModuleType:
    mod = types.ModuleType("fake_flwr_mod")
    mod.f = lambda state, queue: "stock"  # type: ignore[attr-defined]
    return mod


def test_installed_flower_is_supported() -> None:
    fc.check_flower_version()


@pytest.mark.parametrize("found", ["1.41.2", "1.43.0", "2.0.0"])
def test_unsupported_flower_is_one_line_error_naming_the_range(found: str) -> None:
    with pytest.raises(fc.FlowerIncompatible) as err:
        fc.check_flower_version(found)
    assert "\n" not in str(err.value)
    assert found in str(err.value) and fc.SUPPORTED_RANGE in str(err.value)


def test_patch_is_applied_inside_and_undone_after_even_on_error() -> None:
    mod = _module()
    with (
        pytest.raises(RuntimeError),
        fc.swapped(
            mod, "f", lambda state, queue: "ours", why="test", expect=["state", "queue"]
        ) as on,
    ):
        assert on and mod.f(1, 2) == "ours"
        assert "fake_flwr_mod.f" in fc.active_patches()
        raise RuntimeError
    assert mod.f(1, 2) == "stock"
    assert "fake_flwr_mod.f" not in fc.active_patches()


def test_changed_signature_raises_without_fallback() -> None:
    mod = _module()
    with (
        pytest.raises(fc.FlowerIncompatible, match=r"takes \(state, queue\).*expects"),
        fc.swapped(mod, "f", lambda: None, why="test", expect=["state", "queue", "stop"]),
    ):
        pass
    assert mod.f(1, 2) == "stock"


def test_changed_signature_falls_back_to_stock_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mod = _module()
    caplog.set_level(logging.WARNING, logger="pollinate.flower_compat")
    for _ in range(2):
        with fc.swapped(
            mod, "f", lambda: None, why="faster", expect=["x"], stock_fallback=True
        ) as on:
            assert not on and mod.f(1, 2) == "stock"
    warnings = [r for r in caplog.records if "fake_flwr_mod.f" in r.getMessage()]
    assert len(warnings) == 1 and "stock Flower" in warnings[0].getMessage()
