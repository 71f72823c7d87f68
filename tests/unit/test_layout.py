"""Planning a sharded model's layers, and reading them back from llama-server's log (no process needed)."""

from __future__ import annotations

import pytest

import llamaproc
from llamaproc.model._sharded import _check_split, plan_layers, read_layout

# Lines of llama-server -lv 4 over two rpc workers, `-ts 3,1`, 8 layers (as this build prints them).
LOG = """\
0.00.034.657 I llama_prepare_model_devices: using device RPC0 (127.0.0.1:50101) (unknown id) - 24105 MiB free
0.00.035.194 I llama_prepare_model_devices: using device RPC1 (127.0.0.1:50102) (unknown id) - 24105 MiB free
0.00.035.524 I print_info: n_layer               = 8
0.00.038.149 I load_tensors: RPC0[127.0.0.1:50101] model buffer size =     1.10 MiB
0.00.038.150 I load_tensors: RPC0[127.0.0.1:50102] model buffer size =     0.27 MiB
0.00.040.042 I llama_kv_cache: RPC0[127.0.0.1:50101] KV buffer size =     3.50 MiB
0.00.041.764 I llama_kv_cache: RPC0[127.0.0.1:50102] KV buffer size =     0.50 MiB
0.00.041.990 I llama_kv_cache: size =    4.00 MiB (  2048 cells,   8 layers,  4/1 seqs), K (f16):    2.00 MiB
""".splitlines()
A, B = "127.0.0.1:50101", "127.0.0.1:50102"


@pytest.mark.parametrize(
    ("n_layer", "weights", "expected"),
    [
        (8, [1], [range(0, 9)]),
        (8, [1, 1], [range(0, 5), range(5, 9)]),
        (8, [3, 1], [range(0, 7), range(7, 9)]),
        (8, [1, 0, 1], [range(0, 5), range(5, 5), range(5, 9)]),
        (32, [24105, 24105, 12000], [range(0, 14), range(14, 27), range(27, 33)]),
    ],
)
def test_plan_follows_llama_cpp(n_layer: int, weights: list[float], expected: list[range]) -> None:
    assert plan_layers(n_layer, weights) == expected


def test_layout_read_from_the_log() -> None:
    layout, missing = read_layout(LOG, [A, B], [3, 1], None)
    assert missing == []
    assert layout == [llamaproc.Shard(A, range(0, 7)), llamaproc.Shard(B, range(7, 9))]
    assert layout[0].to_json() == {"address": A, "layers": {"start": 0, "stop": 7}}


def test_the_log_wins_over_the_rule() -> None:
    # The rule says 7 + 1 for 3:1; a log that says 6 and 2 is what the server did.
    lines = [line.replace("3.50 MiB", "3.00 MiB").replace("=     0.50 MiB", "=     1.00 MiB") for line in LOG]
    layout, _ = read_layout(lines, [A, B], [3, 1], None)
    assert [s.layers for s in layout] == [range(0, 6), range(6, 9)]


def test_a_worker_the_server_did_not_use_is_reported() -> None:
    layout, missing = read_layout([line for line in LOG if "RPC1 (" not in line], [A, B], [1, 1], None)
    assert layout == [] and missing == [B]


@pytest.mark.parametrize(
    "split", ["fast", [1], [1, -1], [0, 0], [1, float("nan")], [True, 1], "", None, {"a": 1}]
)
def test_bad_split(split: object) -> None:
    with pytest.raises(llamaproc.InvalidArgumentError) as info:
        _check_split(split, 2)
    assert info.value.param == "split"


def test_good_split() -> None:
    assert _check_split("capacity", 2) is None
    assert _check_split("uniform", 3) is None
    assert _check_split([1, 2.5], 2) == [1.0, 2.5]
