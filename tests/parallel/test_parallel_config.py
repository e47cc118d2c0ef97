"""Layout validation (one-line errors, checked before any process group), the offline rank map,
stage splits and the offline state-dict sharding. No process is launched here."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from hyena_glt import HyenaGLTConfig, HyenaGLTForCausalLM
from megatron_adapters import (
    ParallelConfig,
    ParallelConfigError,
    check_layout,
    initialize_parallel,
    make_layout,
    rank_coords,
    shard_state_dict,
    stage_layers,
)
from megatron_adapters.sharding import tp_concat


def tiny(**kw) -> HyenaGLTConfig:
    base = dict(pattern="SDH*SDH*", d_model=32, num_heads=4, num_filter_groups=4, max_seq_len=64,
                medium_filter_len=16, modal_order=4)  # fmt: skip
    return HyenaGLTConfig(**(base | kw))


# (parallel config, model overrides, world size, sequence length, substrings the one-line error must name)
BAD = [
    pytest.param(ParallelConfig(tp=2, pp=2), {}, 6, 64, ["world size 6", "tp*cp*pp = 2*1*2 = 4"], id="world-size"),
    pytest.param(ParallelConfig(tp=4, cp=2), dict(d_model=36, num_heads=2, num_filter_groups=2), 8, 64,
                 ["d_model=36", "tp*cp = 4*2 = 8"], id="d_model"),  # fmt: skip
    pytest.param(ParallelConfig(tp=4), dict(num_heads=2), 4, 64, ["num_heads=2", "tp*cp = 4*1 = 4"], id="heads"),
    pytest.param(ParallelConfig(tp=2, cp=2), dict(num_filter_groups=2), 4, 64,
                 ["num_filter_groups=2", "tp*cp = 2*2 = 4"], id="filter-groups"),  # fmt: skip
    pytest.param(ParallelConfig(cp=2), {}, 2, 66, ["sequence length 66", "2*cp = 4"], id="seq-len-zigzag"),
    pytest.param(ParallelConfig(tp=4, cp=2, sp=True), dict(num_heads=8, num_filter_groups=8), 8, 20,
                 ["sequence length per CP rank 10", "tp=4"], id="seq-len-sp"),  # fmt: skip
    pytest.param(ParallelConfig(cp=4), {}, 4, 32, ["zigzag chunk length 32/(2*cp) = 4", "6-position halo"], id="halo"),
    pytest.param(ParallelConfig(pp=4), dict(pattern="SDH"), 4, 64, ["3 layers", "pp*vpp = 4*1 = 4"], id="layers"),
    pytest.param(ParallelConfig(pp=3), dict(pattern="SD|H*"), 3, 64,
                 ["gives 2 pipeline stages", "pp*vpp = 3*1 = 3"], id="pattern-stages"),  # fmt: skip
    pytest.param(ParallelConfig(pp=2, vpp=2), dict(pattern="SD|H*"), 2, 64, ["gives 2 pipeline stages", "= 4"],
                 id="pattern-stages-vpp"),  # fmt: skip
    pytest.param(ParallelConfig(vpp=2), {}, 1, 64, ["vpp=2", "pp=1"], id="vpp-without-pp"),
    pytest.param(ParallelConfig(sp=True), {}, 1, 64, ["sequence parallel needs tp > 1"], id="sp-without-tp"),
    pytest.param(ParallelConfig(tp=2), dict(vocab_size=261), 2, 64, ["vocab_size=261", "tp=2"], id="vocab"),
    pytest.param(ParallelConfig(tp=0), {}, 1, 64, ["tp=0"], id="non-positive"),
]


@pytest.mark.parametrize("pcfg,over,world,seq_len,needles", BAD)
def test_constraint_errors_name_the_numbers(pcfg, over, world, seq_len, needles) -> None:
    with pytest.raises(ParallelConfigError) as err:
        check_layout(pcfg, tiny(**over), world_size=world, seq_length=seq_len)
    msg = str(err.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


def test_good_layouts_pass() -> None:
    for pcfg, world in [
        (ParallelConfig(tp=2, cp=2, pp=2, sp=True), 16),
        (ParallelConfig(pp=2, vpp=2), 2),
        (ParallelConfig(cp=4), 4),
    ]:
        check_layout(pcfg, tiny(), world_size=world, seq_length=64)


def test_initialize_parallel_rejects_before_building_any_group(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ParallelConfigError, match="world size 6"):
        initialize_parallel(ParallelConfig(tp=2, pp=2), tiny(), seq_length=64)
    assert not dist.is_initialized()


def test_token_merging_runs_in_every_layout_and_counts_its_byte_blocks_halo() -> None:
    merging = tiny().model_copy(update={"patching": "static"})
    for pcfg in (ParallelConfig(cp=2), ParallelConfig(pp=2), ParallelConfig(tp=2, sp=True),
                 ParallelConfig(tp=2, cp=2, pp=2, sp=True)):
        check_layout(pcfg, merging, seq_length=64)
    # The byte encoder's S blocks (7 taps) need a 6-position halo though the global pattern has no S.
    no_s = merging.model_copy(update={"pattern": "DH*D"})
    check_layout(ParallelConfig(cp=4), no_s.model_copy(update={"patching": "none"}), seq_length=32)
    with pytest.raises(ParallelConfigError, match="6-position halo"):
        check_layout(ParallelConfig(cp=4), no_s, seq_length=32)


@pytest.mark.parametrize("tp,cp,pp,world", [(2, 2, 2, 16), (1, 2, 2, 8), (2, 1, 4, 16), (4, 1, 1, 8)])
def test_rank_coords_match_megatron_rank_generator(tp, cp, pp, world) -> None:
    from megatron.core.parallel_state import RankGenerator

    pcfg = ParallelConfig(tp=tp, cp=cp, pp=pp)
    dp = world // (tp * cp * pp)
    gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp", rank_offset=0)
    for dim in ("tp", "cp", "dp", "pp"):
        for ranks in gen.get_ranks(dim):
            # members of one megatron group share every coordinate but `dim`, and are ordered by it
            coords = [rank_coords(r, pcfg, world) for r in ranks]
            assert [getattr(c, dim) for c in coords] == list(range(len(ranks)))
            others = {tuple(getattr(c, d) for d in ("tp", "cp", "dp", "pp") if d != dim) for c in coords}
            assert len(others) == 1


def test_stage_layers() -> None:
    assert stage_layers(tiny(), 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert stage_layers(tiny(pattern="SDH*SDH"), 3) == [[0, 1, 2], [3, 4], [5, 6]]  # uneven default
    assert stage_layers(tiny(pattern="S|DH*SD|H*"), 3) == [[0], [1, 2, 3, 4, 5], [6, 7]]  # from the pattern


@pytest.mark.parametrize(
    "pcfg,world,tied",
    [(ParallelConfig(tp=2, pp=2), 4, True), (ParallelConfig(tp=2, pp=2, vpp=2), 8, False), (ParallelConfig(cp=2), 2, True)],
)
def test_shard_state_dict_partitions_the_full_state(pcfg, world, tied) -> None:
    cfg = tiny(tie_embeddings=tied)
    full = {k: v.detach() for k, v in HyenaGLTForCausalLM(cfg).state_dict().items()}
    layout = make_layout(pcfg, cfg, world)
    shards = {r: shard_state_dict(full, layout, r) for r in range(world)}
    for name, tensor in full.items():
        holders = [r for r in range(world) if name in shards[r]]
        assert holders, f"{name} is held by no rank"
        by_pp: dict[int, dict[int, torch.Tensor]] = {}
        for r in holders:
            c = layout.coords(r)
            by_pp.setdefault(c.pp, {})[c.tp] = shards[r][name]
            assert torch.equal(shards[r][name], shards[holders[0]][name]) or c.tp != layout.coords(holders[0]).tp
        for per_tp in by_pp.values():
            assert sorted(per_tp) == list(range(pcfg.tp))
            assert torch.equal(tp_concat(name, [per_tp[t] for t in range(pcfg.tp)]), tensor), name
        stages = {layout.coords(r).pp for r in holders}
        if name == "model.embed.weight" and tied and pcfg.pp > 1:
            assert stages == {0, pcfg.pp - 1}  # the last stage keeps its own tied copy
        else:
            assert len(stages) == 1, f"{name} on pipeline ranks {stages}"
    # every rank's shard only holds its own layers
    for r, c in ((r, layout.coords(r)) for r in range(world)):
        mine = set(itertools.chain.from_iterable(layout.stage_layers()[s] for s in layout.chunk_stages(c.pp)))
        for name in shards[r]:
            if name.startswith("model.layers."):
                assert int(name.split(".")[2]) in mine
