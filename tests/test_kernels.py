"""The few-position matmul forms: equal to `F.linear` for every row count, shape, bias and dtype; timed on the machine,
the clear winner chosen and kept in the forms file; and a scope that changes nothing about the model outside it
(other threads, after it exits, after an exception)."""

from __future__ import annotations

import json
import shutil
import threading
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_generation import _model, _prompts
from tiny_models import VOCAB, run_layers, tiny_model
from torch import nn
from torch.utils import cpp_extension
from transformers import DynamicCache

from early_exit.architectures import get_decoder_adapter
from early_exit.kernels import FewPositionAttention, attention, multi_position, panels, tuning
from early_exit.kernels.attention import ATTENTION_NAME
from early_exit.kernels.forms import PACKINGS, LinearForm, apply_form, can_pack, pack_weight
from early_exit.kernels.multi_position import FewPositionLinears, linear_for_rows
from early_exit.kernels.tuning import (
    ROW_BUCKETS,
    STOCK_CHOICE,
    FormChoice,
    choice_for,
    forms_file,
    machine_signature,
    tune_forms,
)

# Kernels accumulate in different orders, so results differ by float rounding: relative to the outputs' scale,
# which grows as the square root of the inner size for these random inputs.
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


def assert_matches_linear(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    expected = F.linear(x, weight, bias)
    assert out.shape == expected.shape and out.dtype == expected.dtype and out.is_contiguous()
    scale = TOLERANCES[x.dtype] * x.shape[-1] ** 0.5
    torch.testing.assert_close(out, expected, rtol=TOLERANCES[x.dtype], atol=scale)


@pytest.fixture
def fresh_forms(tmp_path, monkeypatch):
    """No forms timed yet in this process, and a forms file of the test's own."""
    monkeypatch.setattr(tuning, "_CHOICES", {})
    monkeypatch.setenv("EARLY_EXIT_CACHE", str(tmp_path))


def time_forms_as(monkeypatch, winner: LinearForm, winner_time: float = 1.0) -> list[int]:
    """Make the timer find `winner` taking `winner_time` and every other form 2.0 wherever it is a candidate; returns
    a list that grows by the number of weights timed, one entry per shape."""
    timed: list[int] = []

    def fake(weights, rounds):
        timed.append(len(weights))
        packings = [packing for packing in PACKINGS if can_pack(weights[0], packing)]
        return {
            (bucket, form): winner_time if form is winner else 2.0
            for bucket in ROW_BUCKETS
            for form in tuning._candidates(bucket, packings)
        }

    monkeypatch.setattr(tuning, "_time_forms", fake)
    return timed


@settings(max_examples=80, deadline=None)
@given(
    form=st.sampled_from(list(LinearForm)),
    rows=st.integers(1, 32),
    out_features=st.integers(1, 96),
    in_features=st.sampled_from([1, 5, 64, 577, 1030, 2500]),
    batched=st.booleans(),
    strided=st.booleans(),
    with_bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_every_form_matches_linear(form, rows, out_features, in_features, batched, strided, with_bias, dtype, seed):
    """Each form, called directly and chosen by `linear_for_rows`, equals `F.linear` for any shape, layout and bias."""
    assume(form not in (LinearForm.MKL_PACKED, LinearForm.PANELS) or dtype == torch.float32)  # float32 only
    if form is LinearForm.DOUBLED_ROW:  # a form for one row only
        rows, batched = 1, False
    generator = torch.Generator().manual_seed(seed)
    shape = (2, rows, in_features) if batched else (rows, in_features)
    x = torch.randn(shape, generator=generator).to(dtype)
    if strided:  # every other column of a wider input
        x = torch.randn(*shape[:-1], 2 * in_features, generator=generator).to(dtype)[..., ::2]
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype) if with_bias else None
    packed = pack_weight(weight, form) if form in PACKINGS else None
    assert_matches_linear(apply_form(form, x, weight, bias, packed), x, weight, bias)
    choice = FormChoice((form,) * len(ROW_BUCKETS), (form,) * len(ROW_BUCKETS))
    assert_matches_linear(linear_for_rows(x, weight, bias, packed, choice), x, weight, bias)


def test_the_panels_kernel_builds_where_there_is_a_compiler():
    """The panels form is tested above wherever the machine has a C++ compiler: its build must not fail quietly."""
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the panels kernel is left out")
    assert panels.native_panels() is not None and can_pack(torch.randn(3, 2), LinearForm.PANELS)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(2, 20),
    out_features=st.integers(1, 200),
    in_features=st.integers(1, 700),
    seed=st.integers(0, 2**16),
)
def test_panels_give_a_row_the_same_result_whatever_rows_share_its_call(rows, out_features, in_features, seed):
    """Each output is summed in the same order for any number of rows: a verification pass of several positions
    computes exactly what passes of one position would."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    packed = pack_weight(weight, LinearForm.PANELS)
    together = apply_form(LinearForm.PANELS, x, weight, None, packed)
    for row in range(rows):
        assert torch.equal(apply_form(LinearForm.PANELS, x[row : row + 1], weight, None, packed)[0], together[row])
    assert torch.equal(apply_form(LinearForm.PANELS, x[1:], weight, None, packed), together[1:])


def test_panels_refuse_a_packed_weight_of_another_shape():
    packed = pack_weight(torch.randn(70, 16), LinearForm.PANELS)
    with pytest.raises(RuntimeError, match="is not pack_panels of a weight with 70 x 15"):
        panels.panel_linear(torch.randn(2, 15), packed, 70)
    with pytest.raises(RuntimeError, match="is not pack_panels of a weight with 200 x 16"):
        panels.panel_linear(torch.randn(2, 16), packed, 200)


@pytest.mark.parametrize("how", ["switched off", "build fails"])
def test_without_the_panels_kernel_its_form_is_left_out(fresh_forms, monkeypatch, caplog, how):
    """Where the kernel is switched off or cannot be built, the other forms are timed and the forms file keeps the
    choices apart from those of the same machine with the kernel."""
    with_kernel = machine_signature()
    panels.native_panels.cache_clear()
    try:
        if how == "switched off":
            monkeypatch.setenv(panels.SWITCH, "0")
        else:

            def failing_build(**kwargs):
                raise RuntimeError("Error building extension 'early_exit_panels'")

            monkeypatch.setattr(cpp_extension, "load", failing_build)
        weight = torch.randn(8, 8)
        assert not can_pack(weight, LinearForm.PANELS) and can_pack(weight, LinearForm.ONEDNN_PACKED)
        assert machine_signature() != with_kernel and machine_signature().endswith("without the panels kernel")
        assert ("could not be built" in caplog.text) == (how == "build fails")
        timed = []
        monkeypatch.setattr(tuning, "_pick", lambda times: timed.append(set(times)) or STOCK_CHOICE)
        tune_forms([weight], rounds=1)
        assert timed and all(form is not LinearForm.PANELS for _, form in timed[0])
    finally:
        panels.native_panels.cache_clear()


def test_doubled_row_refuses_several_rows():
    with pytest.raises(ValueError, match="one row"):
        apply_form(LinearForm.DOUBLED_ROW, torch.randn(2, 4), torch.randn(3, 4))


def runs_at(form: LinearForm, rows: int) -> bool:
    """Where the timer tries `form`: doubling the row is for one row, `weight @ x.T` for several, packing for any."""
    return form in PACKINGS or {LinearForm.WEIGHT_MAJOR: rows > 1, LinearForm.DOUBLED_ROW: rows == 1}[form]


NON_STOCK = [form for form in LinearForm if form is not LinearForm.STOCK]


@pytest.mark.parametrize("winner", NON_STOCK)
def test_timing_picks_the_fastest_form(fresh_forms, monkeypatch, winner):
    """The timer's clock sees every form but `winner` take 10 ms a call and `winner` 1 ms (a clock of its own, so a
    busy machine cannot reorder them): `winner` is chosen wherever it may run (and packing only where a packed
    weight is at hand)."""
    clock = [0.0]

    def timed(form, *args):
        clock[0] += 0.001 if form is winner else 0.01
        return apply_form(form, *args)

    monkeypatch.setattr(tuning, "apply_form", timed)
    monkeypatch.setattr(tuning.time, "perf_counter", lambda: clock[0])
    weight = torch.randn(24, 16)
    tune_forms([weight], rounds=2)
    choice = choice_for(weight)
    for rows in (1, 2, 3, 5, 16, 40, 500):
        if runs_at(winner, rows):
            assert choice.form(rows, packed=True) is winner
            if winner not in PACKINGS:
                assert choice.form(rows, packed=False) is winner
    assert choice.form(0, packed=True) is LinearForm.STOCK
    assert choice.packing is (winner if winner in PACKINGS else None)


@pytest.mark.parametrize("winner_time, chosen", [(1.99, LinearForm.STOCK), (1.9, LinearForm.ONEDNN_PACKED)])
def test_linear_stays_unless_clearly_beaten(fresh_forms, monkeypatch, winner_time, chosen):
    """`F.linear` (2.0 s here) gives way only to a form more than 3% faster."""
    time_forms_as(monkeypatch, LinearForm.ONEDNN_PACKED, winner_time)
    weight = torch.randn(8, 8)
    tune_forms([weight])
    assert {choice_for(weight).form(rows, packed=True) for rows in (1, 2, 4, 100)} == {chosen}
    assert {choice_for(weight).form(rows, packed=False) for rows in (1, 2, 4, 100)} == {LinearForm.STOCK}


def test_a_row_count_takes_the_form_of_the_first_bucket_that_holds_it():
    forms = list(LinearForm)
    by_bucket = tuple(forms[index % len(forms)] for index in range(1, len(ROW_BUCKETS) + 1))
    choice = FormChoice(by_bucket, tuple(reversed(by_bucket)))
    for rows in range(1, 300):
        bucket = next((index for index, size in enumerate(ROW_BUCKETS) if rows <= size), len(ROW_BUCKETS) - 1)
        assert choice.form(rows, packed=True) is by_bucket[bucket]
        assert choice.form(rows, packed=False) is by_bucket[len(ROW_BUCKETS) - 1 - bucket]
    assert choice.form(0, packed=True) is LinearForm.STOCK


def test_a_weight_gets_one_packed_copy_the_one_that_saves_most():
    """oneDNN's packing wins one row by far, MKL's every row count by less: MKL's saves more over the buckets."""
    times = {(bucket, form): 2.0 for bucket in ROW_BUCKETS for form in tuning._candidates(bucket, list(PACKINGS))}
    for bucket in ROW_BUCKETS:
        times[bucket, LinearForm.ONEDNN_PACKED] = 1.0 if bucket == 1 else 1.9
        times[bucket, LinearForm.MKL_PACKED] = 1.5
    choice = tuning._pick(times)
    assert choice.packed == (LinearForm.MKL_PACKED,) * len(ROW_BUCKETS) and choice.packing is LinearForm.MKL_PACKED
    assert choice.unpacked == (LinearForm.STOCK,) * len(ROW_BUCKETS) and STOCK_CHOICE.packing is None


def test_the_packed_copy_is_chosen_on_the_rows_decoding_runs():
    """Panels win every decoding bucket by a little, oneDNN the larger ones by far: decoding gets the panels, and
    the larger buckets the fastest form that needs no other copy."""
    times = {(bucket, form): 2.0 for bucket in ROW_BUCKETS for form in tuning._candidates(bucket, list(PACKINGS))}
    for bucket in ROW_BUCKETS:
        decoding = bucket in tuning.PACKING_BUCKETS
        times[bucket, LinearForm.PANELS] = 1.5 if decoding else 1.9
        times[bucket, LinearForm.ONEDNN_PACKED] = 1.6 if decoding else 0.1
        times[bucket, LinearForm.WEIGHT_MAJOR if bucket > 1 else LinearForm.DOUBLED_ROW] = 1.8
    choice = tuning._pick(times)
    assert choice.packing is LinearForm.PANELS
    assert all(
        form is (LinearForm.PANELS if bucket in tuning.PACKING_BUCKETS else LinearForm.WEIGHT_MAJOR)
        for bucket, form in zip(ROW_BUCKETS, choice.packed)
    )


def test_untimed_shapes_and_other_dtypes_run_linear(fresh_forms, monkeypatch):
    timed = time_forms_as(monkeypatch, LinearForm.ONEDNN_PACKED)
    tune_forms([torch.randn(8, 8, dtype=torch.float16), torch.randn(8, 8, dtype=torch.float64)])
    assert timed == []  # no forms to choose from for these dtypes
    assert choice_for(torch.randn(8, 8, dtype=torch.float16)) is STOCK_CHOICE
    assert choice_for(torch.randn(8, 9)) is STOCK_CHOICE


def test_timed_forms_are_saved_per_machine_and_read_back(fresh_forms, monkeypatch, tmp_path):
    timed = time_forms_as(monkeypatch, LinearForm.ONEDNN_PACKED)
    weights = [torch.randn(8, 8), torch.randn(8, 8), torch.randn(4, 8, dtype=torch.bfloat16)]
    tune_forms(weights + [weights[0]])  # a tied weight is timed once
    assert sorted(timed) == [1, 2]
    saved = json.loads(forms_file().read_text())
    assert list(saved["machines"]) == [machine_signature()] and len(saved["machines"][machine_signature()]) == 2
    assert [path.name for path in tmp_path.iterdir()] == ["matmul-forms.json"]  # no temporary file left
    # A new process on the same machine reads the file instead of timing.
    expected = {id(weight): choice_for(weight) for weight in weights}
    monkeypatch.setattr(tuning, "_CHOICES", {})
    tune_forms(weights)
    assert len(timed) == 2 and {id(weight): choice_for(weight) for weight in weights} == expected
    # Another machine times again, and the file keeps both machines' entries.
    monkeypatch.setattr(tuning, "_CHOICES", {})
    monkeypatch.setattr(tuning, "machine_signature", lambda: "another CPU")
    tune_forms(weights[:1])
    assert len(timed) == 3
    assert len(json.loads(forms_file().read_text())["machines"]) == 2


@pytest.mark.parametrize("content", ["{not json", '{"format": 1}', "[]", '{"format": 99, "machines": {}}'])
def test_a_broken_forms_file_is_timed_again_and_replaced(fresh_forms, monkeypatch, caplog, content):
    timed = time_forms_as(monkeypatch, LinearForm.WEIGHT_MAJOR)
    forms_file().parent.mkdir(parents=True, exist_ok=True)
    forms_file().write_text(content)
    weight = torch.randn(8, 8)
    tune_forms([weight])
    assert len(timed) == 1 and choice_for(weight).form(4, packed=False) is LinearForm.WEIGHT_MAJOR
    assert machine_signature() in json.loads(forms_file().read_text())["machines"]


def test_an_unwritable_cache_keeps_the_choice_for_the_process(fresh_forms, monkeypatch, tmp_path, caplog):
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("EARLY_EXIT_CACHE", str(tmp_path / "not-a-folder"))
    time_forms_as(monkeypatch, LinearForm.ONEDNN_PACKED)
    weight = torch.randn(8, 8)
    tune_forms([weight])
    assert choice_for(weight).packing is LinearForm.ONEDNN_PACKED
    assert "Could not save the matmul forms" in caplog.text


def test_gradients_go_through_linear():
    x = torch.randn(3, 8, requires_grad=True)
    weight = torch.randn(5, 8, requires_grad=True)
    linear_for_rows(x, weight).sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand(3, 8))
    torch.testing.assert_close(weight.grad, x.detach().sum(0).expand(5, 8))


class Doubling(nn.Linear):
    """A subclass with its own `forward`, which the scope must leave alone."""

    def forward(self, x):
        return 2 * super().forward(x)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16, bias=False), Doubling(16, 4)).eval()


def module_state(model: nn.Module) -> list:
    """Everything the scope could change: each module's attributes, parameters' identities and storage."""
    return [(name, dict(vars(module))) for name, module in model.named_modules()] + [
        (name, id(p), p.data_ptr(), p._version) for name, p in model.named_parameters()
    ]


@pytest.mark.parametrize("prepack", [True, False])
def test_scope_matches_and_restores_the_model(fresh_forms, monkeypatch, prepack):
    time_forms_as(monkeypatch, LinearForm.ONEDNN_PACKED)
    model = small_model()
    before = module_state(model)
    x = torch.randn(4, 8)
    expected = model(x)
    scope = FewPositionLinears(model, prepack=prepack)
    assert module_state(model) == before  # building it patches nothing
    with torch.inference_mode(), scope:
        assert scope.active
        # Only oneDNN's packed form beats `F.linear` here: without packed weights no module needs patching.
        assert ("forward" in vars(model[0])) == prepack and "forward" not in vars(model[3])
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        with scope:  # blocks nest; the inner exit restores nothing
            pass
        assert ("forward" in vars(model[0])) == prepack
    assert not scope.active
    assert module_state(model) == before
    assert (scope.packed_bytes > 0) == prepack


def test_scope_restores_after_an_exception():
    model = small_model()
    before = module_state(model)
    with pytest.raises(ValueError, match="inside"), FewPositionLinears(model):
        raise ValueError("inside")
    assert module_state(model) == before


def test_other_threads_run_the_stock_forward(fresh_forms, monkeypatch):
    """While one thread is inside the scope, another calling the same modules goes through `F.linear` exactly."""
    time_forms_as(monkeypatch, LinearForm.WEIGHT_MAJOR)
    model = small_model()
    x = torch.randn(3, 8)
    expected = model(x)
    calls = []
    in_form = multi_position._linear_in

    def counting(*args):
        calls.append(threading.get_ident())
        return in_form(*args)

    monkeypatch.setattr(multi_position, "_linear_in", counting)
    outside: list[torch.Tensor] = []
    with FewPositionLinears(model):
        model(x)
        thread = threading.Thread(target=lambda: outside.append(model(x)))
        thread.start()
        thread.join()
    assert set(calls) == {threading.get_ident()} and len(calls) == 2
    assert torch.equal(outside[0], expected)


def test_modules_patched_by_someone_else_are_left_alone():
    model = small_model()
    hook = model[0].forward = lambda x: torch.zeros(x.shape[0], 16)
    with FewPositionLinears(model):
        assert vars(model[0])["forward"] is hook
    assert vars(model[0])["forward"] is hook


@pytest.mark.parametrize("packing", PACKINGS)
def test_packed_weights_follow_weight_updates(fresh_forms, monkeypatch, packing):
    time_forms_as(monkeypatch, packing)
    model = nn.Linear(8, 8, bias=False).eval()
    scope = FewPositionLinears(model)
    assert scope.packed_bytes > 0
    x = torch.randn(5, 8)  # rows that run on the packed weight
    with torch.no_grad():
        model.weight.mul_(2)  # before the block: re-packed on entry
    with torch.inference_mode(), scope:
        torch.testing.assert_close(model(x), F.linear(x, model.weight))
    with scope:
        with torch.no_grad():
            model.weight.add_(1)  # inside the block: the stale packed copy is not used
            torch.testing.assert_close(model(x), F.linear(x, model.weight))
        model.weight = nn.Parameter(torch.randn(8, 8))  # a new tensor
        with torch.no_grad():
            torch.testing.assert_close(model(x), F.linear(x, model.weight))


@pytest.mark.parametrize("winner", NON_STOCK)
def test_decoder_logits_equal_with_and_without_the_scope(fresh_forms, monkeypatch, winner):
    """A tiny Llama run layer by layer through its adapter, prompt then 1, 2 and 4 new positions on the cache, with
    each form timed fastest."""
    time_forms_as(monkeypatch, winner)
    model = tiny_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    config = model.config
    adapter = get_decoder_adapter(model)
    ids = torch.randint(0, VOCAB, (1, 13))
    scope = FewPositionLinears(model.model.layers)
    results = []
    for use_scope in (False, True):
        cache = DynamicCache(config=config)
        logits = []
        with torch.inference_mode(), scope if use_scope else nullcontext():
            for start, stop in ((0, 6), (6, 7), (7, 9), (9, 13)):
                logits.append(run_layers(adapter, ids[:, start:stop], cache=cache)[0])
        results.append(torch.cat(logits, 1))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0], model(ids).logits, rtol=1e-5, atol=1e-5)


def test_the_scope_times_again_when_the_thread_count_changes(fresh_forms, monkeypatch):
    timed = time_forms_as(monkeypatch, LinearForm.ONEDNN_PACKED)
    model = small_model()
    scope = FewPositionLinears(model)
    assert len(timed) == 2  # 16x8 and 16x16 (the subclass with its own forward is left alone)
    threads = torch.get_num_threads()
    with scope:
        pass
    assert len(timed) == 2
    torch.set_num_threads(threads + 1)
    try:
        with scope:
            assert choice_for(model[0].weight).packing is LinearForm.ONEDNN_PACKED  # the choice at the new count
    finally:
        torch.set_num_threads(threads)
    assert len(timed) == 4


# --- attention: key/value heads shared, not copied, in passes of several positions --------------------------------
def _count_shared_calls(monkeypatch) -> list[int]:
    """Record the thread of every attention call that `shared_kv_sdpa` computes itself."""
    calls: list[int] = []
    shares = attention._shares_heads

    def counting(*args):
        taken = shares(*args)
        if taken:
            calls.append(threading.get_ident())
        return taken

    monkeypatch.setattr(attention, "_shares_heads", counting)
    return calls


@settings(max_examples=25, deadline=None)
@given(
    model_type=st.sampled_from(["llama", "mistral", "qwen3", "phi3", "gemma3_text", "gpt2"]),
    batch=st.integers(1, 2),
    steps=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_attention_scope_matches_sdpa_over_a_cache(model_type, batch, steps, seed):
    """Prompt (left-padded in a batch), then passes of 1-5 new positions on the cache: the same logits with and
    without the scope, and the shared path taken for every grouped-query pass of several positions on the cache
    (gpt2's ungrouped heads stay on transformers' own function)."""
    model = tiny_model(model_type, attention="sdpa")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, 6 + sum(steps)), generator=generator)
    mask = torch.ones_like(ids)
    mask[1:, :2] = 0
    scope = FewPositionAttention(model)
    shared = []
    results = []
    for use_scope in (False, True):
        cache = DynamicCache(config=model.config)
        logits, start = [], 0
        with pytest.MonkeyPatch.context() as patch, torch.inference_mode(), scope if use_scope else nullcontext():
            calls = _count_shared_calls(patch)
            for stop in (6, *(6 + sum(steps[: index + 1]) for index in range(len(steps)))):
                out = model(ids[:, start:stop], attention_mask=mask[:, :stop], past_key_values=cache, use_cache=True)
                logits.append(out.logits)
                start = stop
        shared.append(len(calls))
        results.append(torch.cat(logits, 1))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
    # Every pass of several positions on the cache needs a mask; the prompt's only where padded or windowed.
    layers = model.config.num_hidden_layers
    on_cache = layers * sum(step > 1 for step in steps)
    assert shared[0] == 0
    if model_type == "gpt2":
        assert shared[1] == 0
    else:
        assert on_cache <= shared[1] <= on_cache + layers


def test_attention_scope_switches_only_sdpa_configs_and_only_for_its_threads(monkeypatch):
    model = tiny_model("llama", attention="sdpa")
    eager = tiny_model("llama")
    scope = FewPositionAttention(torch.nn.ModuleList([model, eager]))
    ids = torch.randint(3, VOCAB, (1, 8))
    padded = torch.ones_like(ids)
    padded[:, 0] = 0  # a mask SDPA needs, so the shared path is taken
    calls = _count_shared_calls(monkeypatch)
    expected = model(ids, attention_mask=padded).logits[:, 1:]
    saved = model.config.to_dict()
    outside: list[torch.Tensor] = []
    with torch.inference_mode(), scope:
        assert model.config._attn_implementation == ATTENTION_NAME and eager.config._attn_implementation == "eager"
        with scope:  # blocks nest; the inner exit restores nothing
            pass
        assert model.config._attn_implementation == ATTENTION_NAME
        thread = threading.Thread(target=lambda: outside.append(model(ids, attention_mask=padded).logits[:, 1:]))
        thread.start()
        thread.join()
        torch.testing.assert_close(model(ids, attention_mask=padded).logits[:, 1:], expected, rtol=1e-5, atol=1e-5)
    assert set(calls) == {threading.get_ident()} and len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(outside[0], expected)
    assert model.config._attn_implementation == "sdpa" and model.config.to_dict() == saved
    with pytest.raises(ValueError, match="inside"), scope:
        raise ValueError("inside")
    assert model.config._attn_implementation == "sdpa"


def test_speculative_verification_shares_key_value_heads_and_keeps_generates_output(monkeypatch):
    """DSSD verifies drafts in passes of several positions: on an SDPA model they attend with shared key/value heads
    (the fused layers call SDPA so; not `base.generate`, which runs without the scope), and the output is still
    `base.generate`'s."""
    model = _model("llama", "sdpa")
    ids, mask = _prompts(3, 2, 6, padded=True)
    arguments = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = model.base.generate(ids, attention_mask=mask, **arguments)
    sdpa = F.scaled_dot_product_attention
    shared: list[int] = []

    def counting(query, *args, **kwargs):
        if query.shape[2] > 1 and kwargs.get("enable_gqa"):
            shared.append(query.shape[2])
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    output = model.generate(
        ids,
        attention_mask=mask,
        speculative=True,
        exit_thresholds=[0.0, 0.0, 0.0],
        return_dict_in_generate=True,
        **arguments,
    )
    assert torch.equal(output.sequences, expected)
    assert output.drafted.sum() > 0 and len(shared) > 0
