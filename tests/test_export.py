"""Exports vLLM honours. vLLM has no CPU wheel, so its rules for reading windows from a config.json are written out
here from its source (see docs/REAL_CHECKPOINTS.md, "Exports"), and every export is checked against them and against transformers:
- vllm/transformers_utils/config.py, is_interleaved: layer_types with more than one kind of layer;
- vllm/model_executor/models/qwen2.py, Qwen2Model.__init__ (Qwen3Model reuses it): when is_interleaved, assert
  max_window_layers == num_hidden_layers; its attention passes no per-layer window, so every layer takes the
  model-level window (the config's sliding_window, which transformers' Qwen2/Qwen3 configs set to None unless
  use_sliding_window);
- vllm/model_executor/models/llama.py, LlamaAttention (Mistral reuses it): per_layer_sliding_window =
  sliding_window where layer_types[i] == "sliding_attention"; without layer_types every layer takes the model-level
  window (vllm attention layer: per_layer_sliding_window, else cache_config.sliding_window)."""
import pytest

from conftest import ARCHS
import swarr
from support import checkpoint


def vllm_windows(hf: dict) -> list:
    """Per-layer windows vLLM would run for config.json `hf`, or AssertionError where it refuses to load."""
    import transformers
    arch = hf["architectures"][0]
    cfg = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**{k: v for k, v in hf.items()
                                                                       if k not in ("architectures", "model_type")})
    n, model_level = cfg.num_hidden_layers, getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if arch.startswith("Qwen"):
        if types and len(set(types)) > 1:
            assert cfg.max_window_layers == n, "Sliding window for some but all layers is not supported"
        return [model_level] * n
    if types:  # Llama / Mistral: per layer
        return [cfg.sliding_window if t == "sliding_attention" else None for t in types]
    return [model_level] * n


def transformers_windows(hf: dict) -> list:
    """Per-layer windows transformers runs (its config's layer_types; Mistral windows every layer)."""
    import transformers
    arch = hf["architectures"][0]
    cfg = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**{k: v for k, v in hf.items()
                                                                       if k not in ("architectures", "model_type")})
    if arch == "MistralForCausalLM":
        return [cfg.sliding_window] * cfg.num_hidden_layers
    if arch == "LlamaForCausalLM":
        return [None] * cfg.num_hidden_layers
    return [cfg.sliding_window if t == "sliding_attention" else None for t in cfg.layer_types]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layout", ["none", "all", "first", "last"])
def test_export_runs_with_the_same_windows_in_transformers_and_vllm_or_is_refused(ckpts, arch, layout):
    model, _ = swarr.load(str(ckpts[arch]))
    layers = {"none": None, "all": [0, 1], "first": [0], "last": [1]}[layout]
    if layers is not None:
        model.set_window(7, layers)
    elif arch == "MistralForCausalLM":
        model.set_window(None)
    try:
        hf = checkpoint.export_config(model.cfg, model.windows, "float32")
    except swarr.SwarrError as e:
        assert layout in ("first", "last") and "window all layers" in str(e)  # refused: a mixed layout ...
        # ... rightly: the configs that could express it run differently in vLLM or in transformers
        types = ["sliding_attention" if w else "full_attention" for w in model.windows]
        if arch.startswith("Qwen"):
            for mwl in (model.windows.index(7), len(types)):  # max_window_layers as transformers reads it, or = n
                mixed = dict(model.cfg.hf, use_sliding_window=True, sliding_window=7, max_window_layers=mwl,
                             layer_types=types)
                assert transformers_windows(mixed) == model.windows
                try:
                    assert vllm_windows(mixed) != model.windows
                except AssertionError as refused:
                    assert "some but all layers" in str(refused)
        else:  # a Mistral with layer_types: vLLM would read them, transformers' Mistral windows every layer
            mixed = dict(model.cfg.hf, architectures=["MistralForCausalLM"], sliding_window=7, layer_types=types)
            assert vllm_windows(mixed) == model.windows != transformers_windows(mixed)
        return
    assert layout in ("none", "all")
    assert vllm_windows(hf) == transformers_windows(hf) == model.windows
    assert swarr.Config.from_hf(hf).windows == model.windows


def test_vllm_rules_catch_what_they_should():
    """The emulation itself: a mixed Qwen2 layout fails to load, or runs every layer windowed (the silent case),
    while Llama/Mistral layer_types are read per layer."""
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2)
    mixed = ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    with pytest.raises(AssertionError, match="some but all layers"):
        vllm_windows(dict(base, architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=8,
                          max_window_layers=2, layer_types=mixed))
    assert vllm_windows(dict(base, architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=8,
                             max_window_layers=4, layer_types=mixed)) == [8] * 4  # transformers: [None, None, 8, 8]
    assert vllm_windows(dict(base, architectures=["MistralForCausalLM"], sliding_window=8, layer_types=mixed)) == [
        None, None, 8, 8]
    assert vllm_windows(dict(base, architectures=["MistralForCausalLM"], sliding_window=8)) == [8] * 4
