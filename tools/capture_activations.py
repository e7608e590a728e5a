#!/usr/bin/env python3
"""Capture the attention activations of a Hugging Face Llama / Mistral / Qwen2-family model on text, in
the activation layout that the kqsvd tool reads (docs/activations.md).

    python tools/capture_activations.py --model HuggingFaceTB/SmolLM2-135M --text stories.txt \\
        --max-tokens 512 --batch-size 8 --max-sequences 256 --out-prefix data/calib

writes data/calib-00000.safetensors, data/calib-00001.safetensors, ... one batch per file, streamed
to disk as it goes (memory holds one batch). Each file holds, per layer l,
    layers.{l}.q       [batch, n_heads,    T, head_dim]
    layers.{l}.k, .v   [batch, n_kv_heads, T, head_dim]
    layers.{l}.o_proj  [hidden, n_heads * head_dim]     (first file only, unless --o-proj all|none)
and the metadata rope, rope_style ("half": transformers rotates halves), rope_theta, model.
Queries and keys are saved after RoPE (rotated by the model's own rotary embedding, as attention
uses them) unless --pre-rope is given.

Documents are split on --separator (default "<|endoftext|>"), stripped, tokenized with the model's
tokenizer (BOS included when the tokenizer adds one), and those with at least T tokens are truncated to
T: every sequence of a batch has the same length and starts at position 0, so there is no padding
and no attention mask.

    python tools/capture_activations.py --self-test

builds a randomly initialised tiny LlamaConfig model (nothing is downloaded), captures a batch, and
checks the file against the model's own attention: softmax(q k^T / sqrt(d)) v through o_proj, from
the saved tensors, must equal the attention module's output; pre-RoPE keys rotated by rope_theta
must equal the post-RoPE ones. Needs torch, transformers and safetensors.
"""

import argparse
import json
import os
import sys
import tempfile


def head_dim_of(config):
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def decoder_layers(model):
    """The decoder layers of a *ForCausalLM (model.model.layers) or a bare *Model (model.layers)."""
    inner = getattr(model, "model", model)
    return inner.layers


class AttentionHooks:
    """Forward hooks on every layer's q_proj, k_proj and v_proj: their outputs are the pre-RoPE queries
    and keys and the values, [batch, T, heads * head_dim]."""

    def __init__(self, model):
        self.outputs = {}
        self.handles = []
        for index, layer in enumerate(decoder_layers(model)):
            for part in ("q", "k", "v"):
                module = getattr(layer.self_attn, part + "_proj")
                self.handles.append(module.register_forward_hook(self._saver(index, part)))

    def _saver(self, index, part):
        def save(_module, _inputs, output):
            self.outputs[(index, part)] = output.detach()
        return save

    def remove(self):
        for handle in self.handles:
            handle.remove()


def rotary_cos_sin(model, values, position_ids):
    """cos, sin of the model's own rotary embedding (including any rope_scaling it uses)."""
    inner = getattr(model, "model", model)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None:  # older transformers keep it on each attention module
        rotary = decoder_layers(model)[0].self_attn.rotary_emb
    return rotary(values, position_ids)


def capture_batch(model, input_ids, pre_rope):
    """Runs one batch [batch, T] through the model; returns {name: tensor} in the activation layout."""
    import torch

    config = model.config
    d = head_dim_of(config)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    module = sys.modules[type(decoder_layers(model)[0].self_attn).__module__]
    batch, tokens = input_ids.shape
    position_ids = torch.arange(tokens, device=input_ids.device).unsqueeze(0).expand(batch, -1)
    hooks = AttentionHooks(model)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    finally:
        hooks.remove()
    tensors = {}
    for index in range(len(decoder_layers(model))):
        def split(part, count):
            # [batch, T, count * d] -> [batch, count, T, d]: the past_key_values layout.
            return hooks.outputs[(index, part)].view(batch, tokens, count, d).transpose(1, 2).contiguous()
        q, k, v = split("q", heads), split("k", kv_heads), split("v", kv_heads)
        if not pre_rope:
            cos, sin = rotary_cos_sin(model, v, position_ids)
            q, k = module.apply_rotary_pos_emb(q, k, cos, sin)
        tensors["layers.%d.q" % index] = q
        tensors["layers.%d.k" % index] = k
        tensors["layers.%d.v" % index] = v
    return tensors


def output_weights(model):
    return {"layers.%d.o_proj" % i: layer.self_attn.o_proj.weight.detach()
            for i, layer in enumerate(decoder_layers(model))}


def metadata_of(model, name, pre_rope):
    config = model.config
    metadata = {
        "model": name,
        "rope": "none" if pre_rope else "applied",
        "rope_style": "half",  # transformers' rotate_half convention
        "rope_theta": repr(float(getattr(config, "rope_theta", 10000.0))),
        "source": "tools/capture_activations.py",
    }
    if getattr(config, "rope_scaling", None):
        # Post-RoPE files are exact either way; pre-RoPE evaluation in kqsvd rotates without scaling.
        metadata["rope_scaling"] = json.dumps(config.rope_scaling)
    return metadata


def write_file(path, tensors, metadata, dtype, force):
    """Atomically: a temporary file in the same directory, then a rename; never replaces without force."""
    import torch
    from safetensors.torch import save_file

    if os.path.exists(path) and not force:
        raise SystemExit("capture_activations: '%s' exists; pass --force to replace it" % path)
    storage = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    converted = {name: tensor.to("cpu", storage).contiguous() for name, tensor in tensors.items()}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".tmp-", dir=directory)
    os.close(handle)
    try:
        save_file(converted, temporary, metadata=metadata)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def documents(path, separator):
    with open(path, encoding="utf-8") as text:
        for part in text.read().split(separator):
            part = part.strip()
            if part:
                yield part


def capture(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).to(args.device).eval()
    name = args.name or args.model.rstrip("/").split("/")[-1]
    metadata = metadata_of(model, name, args.pre_rope)
    weights = output_weights(model)
    pending, written, sequences = [], 0, 0

    def flush():
        nonlocal pending, written
        if not pending:
            return
        tensors = capture_batch(model, torch.tensor(pending, device=args.device), args.pre_rope)
        if args.o_proj == "all" or (args.o_proj == "first" and written == 0):
            tensors.update(weights)
        path = "%s-%05d.safetensors" % (args.out_prefix, written)
        write_file(path, tensors, metadata, args.dtype, args.force)
        print("capture_activations: wrote %s (%d sequences x %d tokens)" % (path, len(pending), args.max_tokens),
              file=sys.stderr)
        written += 1
        pending = []

    for document in documents(args.text, args.separator):
        ids = tokenizer(document)["input_ids"]
        if len(ids) < args.max_tokens:
            continue
        pending.append(ids[:args.max_tokens])
        sequences += 1
        if len(pending) == args.batch_size:
            flush()
        if args.max_sequences and sequences >= args.max_sequences:
            break
    flush()
    if written == 0:
        raise SystemExit("capture_activations: no document has %d tokens" % args.max_tokens)


def self_test():
    """Checks capture_batch against the model's own attention on a random tiny Llama (no download)."""
    import torch
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=500.0)
    model = LlamaForCausalLM(config).eval()
    batch, tokens, d = 3, 11, head_dim_of(config)
    input_ids = torch.randint(0, config.vocab_size, (batch, tokens))

    # The attention modules' own outputs (after o_proj), to compare against.
    attention_outputs = {}
    handles = [layer.self_attn.register_forward_hook(
        lambda _m, _i, output, index=index: attention_outputs.__setitem__(index, output[0].detach()))
        for index, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    for handle in handles:
        handle.remove()

    with tempfile.TemporaryDirectory() as directory:
        paths = {}
        for pre_rope in (False, True):
            tensors = capture_batch(model, input_ids, pre_rope)
            tensors.update(output_weights(model))
            paths[pre_rope] = os.path.join(directory, "pre.safetensors" if pre_rope else "post.safetensors")
            write_file(paths[pre_rope], tensors, metadata_of(model, "tiny-llama", pre_rope), "f32", force=False)
        with safe_open(paths[False], "pt") as post, safe_open(paths[True], "pt") as pre:
            meta = post.metadata()
            assert meta["rope"] == "applied" and meta["rope_style"] == "half", meta
            assert float(meta["rope_theta"]) == 500.0 and pre.metadata()["rope"] == "none"
            group = config.num_attention_heads // config.num_key_value_heads
            mask = torch.ones(tokens, tokens, dtype=torch.bool).tril()
            for index in range(config.num_hidden_layers):
                q = post.get_tensor("layers.%d.q" % index)
                k = post.get_tensor("layers.%d.k" % index)
                v = post.get_tensor("layers.%d.v" % index)
                weight = post.get_tensor("layers.%d.o_proj" % index)
                assert q.shape == (batch, 4, tokens, d) and k.shape == (batch, 2, tokens, d), (q.shape, k.shape)
                assert v.shape == k.shape and weight.shape == (64, 4 * d)
                # Causal attention from the saved tensors; query head h reads KV head h // group.
                keys = k.repeat_interleave(group, dim=1)
                values = v.repeat_interleave(group, dim=1)
                scores = (q @ keys.transpose(-1, -2)) / d ** 0.5
                weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
                heads = (weights @ values).transpose(1, 2).reshape(batch, tokens, 4 * d)
                recomputed = heads @ weight.T
                error = (recomputed - attention_outputs[index]).abs().max().item()
                assert error < 1e-4, "layer %d: attention from the file differs by %g" % (index, error)
                # Pre-RoPE keys, rotated by rope_theta with rotate-half, are the post-RoPE keys.
                raw = pre.get_tensor("layers.%d.k" % index)
                frequencies = 500.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
                angles = torch.arange(tokens, dtype=torch.float64)[:, None] * frequencies[None, :]
                cos = torch.cat([angles.cos(), angles.cos()], -1).float()
                sin = torch.cat([angles.sin(), angles.sin()], -1).float()
                rotated = raw * cos + torch.cat([-raw[..., d // 2:], raw[..., :d // 2]], -1) * sin
                error = (rotated - k).abs().max().item()
                assert error < 1e-4, "layer %d: pre-RoPE keys rotated differ by %g" % (index, error)
        try:
            write_file(paths[False], {}, {}, "f32", force=False)
            raise AssertionError("an existing file was replaced without --force")
        except SystemExit:
            pass
    print("capture_activations: self-test passed")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hugging Face model name or local directory")
    parser.add_argument("--text", help="UTF-8 text file of documents")
    parser.add_argument("--separator", default="<|endoftext|>", help="document separator (default <|endoftext|>)")
    parser.add_argument("--max-tokens", type=int, default=512, help="tokens per sequence T (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per file (default 8)")
    parser.add_argument("--max-sequences", type=int, default=0, help="stop after this many sequences (0: all)")
    parser.add_argument("--out-prefix", help="files are written as PREFIX-00000.safetensors, ...")
    parser.add_argument("--pre-rope", action="store_true", help="save queries and keys before RoPE")
    parser.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f16", help="storage type (default f16)")
    parser.add_argument("--o-proj", choices=["first", "all", "none"], default="first",
                        help="which files carry layers.{l}.o_proj (default: the first)")
    parser.add_argument("--name", help="model name for the metadata (default: the last part of --model)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--force", action="store_true", help="replace existing files")
    parser.add_argument("--self-test", action="store_true", help="check the capture on a random tiny model")
    args = parser.parse_args()
    if args.self_test:
        self_test()
        return
    if not (args.model and args.text and args.out_prefix):
        parser.error("--model, --text and --out-prefix are required (or --self-test)")
    if args.max_tokens < 1 or args.batch_size < 1:
        parser.error("--max-tokens and --batch-size must be positive")
    capture(args)


if __name__ == "__main__":
    main()
