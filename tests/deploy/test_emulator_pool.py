"""The emulator pool's split of devices over processes, and what it reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from pollinate.deploy.emulator import DeviceSpec
from pollinate.deploy.emulator_pool import PoolStats, _Report, load_client_app, split_devices


def _devices(n: int) -> list[DeviceSpec]:
    return [DeviceSpec(Path(f"k{i}"), {"data-file": f"d{i}.csv"}) for i in range(n)]


@pytest.mark.parametrize(("n", "processes"), [(1, 1), (10, 3), (1000, 16), (3, 8), (7, 7)])
def test_every_device_goes_to_exactly_one_process(n: int, processes: int) -> None:
    devices = _devices(n)
    shares = split_devices(devices, processes)
    assert len(shares) == min(n, processes)
    dealt = [d for share in shares for d in share]
    assert sorted(map(id, dealt)) == sorted(map(id, devices))  # each once, none lost
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_split_refuses_zero_processes() -> None:
    with pytest.raises(ValueError, match="processes"):
        split_devices(_devices(3), 0)


def test_pool_stats_sum_the_processes_reports() -> None:
    stats = PoolStats(
        [
            _Report(active=2, requests={"PullMessages": 3, "PushObject": 1}, messages=4, cpu=1.5),
            _Report(active=1, requests={"PullMessages": 2}, messages=1, app_errors=1, cpu=0.5),
        ]
    )
    assert stats.requests == {"PullMessages": 5, "PushObject": 1}
    assert (stats.messages, stats.app_errors, stats.cpu) == (5, 1, 2.0)


def test_client_app_path_is_checked() -> None:
    assert load_client_app("pollinate.protocol:IDS") == "ids"
    with pytest.raises(ValueError, match="module:attribute"):
        load_client_app("pollinate.client.app")
    with pytest.raises(AttributeError):
        load_client_app("pollinate.protocol:no_such_thing")
