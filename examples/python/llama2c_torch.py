"""A pure-PyTorch llama2.c model (the checkpoints in data/models) calibrated and compressed with kqsvd:
the example a PyTorch user copies for their own model.

    python3 examples/python/llama2c_torch.py --model data/models/tinyllama-h64/model.bin \\
        --tokenizer data/models/tinyllama-h64/tok512.bin --text data/text/tinystories/tinystories_sample.txt \\
        --calib-stories 0:50 --eval-stories 2100:2110 --probe-stories 200:208 --rank 32 --sensitivity-out sensitivity.json

1. Forward hooks on each attention layer stream the rotated queries and keys and the values into a
   kqsvd.ModelCalibration: d x d Grams per head, never the activations (torch tensors reach the module
   through .numpy(), without a copy).
2. kqsvd.ModelProjections.fit fits KQ-SVD at rank r (values fitted to each layer's o_proj).
3. The same forward runs with a compressed cache: keys kept as k A, values as v A_v, scores (q B)(k A)^T,
   outputs decompressed by B_v^T -- kqsvd::llama::CompressedKvCache's post-RoPE arithmetic.
4. KL(full || compressed) on held-out stories, and a first-order sensitivity probe (each layer's keys or
   values alone at rank r: w = KL increase / predicted squared error) written as the file
   `kqsvd fit --budget B --sensitivity FILE` reads (docs/sensitivity.md).
"""
import argparse
import math
import struct

import numpy as np
import torch

import kqsvd


# ---- llama2.c checkpoint and tokenizer -----------------------------------------------------------------


def load_checkpoint(path):
    """llama2.c's v0 export: 7 int32 (dim, hidden_dim, layers, heads, kv_heads, vocab, seq_len), then float32
    tensors in [out][in] layout; a negative vocab size means the classifier follows the other weights."""
    with open(path, "rb") as f:
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack("<7i", f.read(28))
        data = np.frombuffer(f.read(), dtype="<f4")
    shared = vocab > 0
    vocab = abs(vocab)
    head_dim, kv_dim = dim // heads, (dim // heads) * kv_heads
    offset = 0

    def take(*shape):
        nonlocal offset
        count = int(np.prod(shape))
        array = torch.from_numpy(data[offset : offset + count].reshape(shape).copy())
        offset += count
        return array

    w = {"embedding": take(vocab, dim), "rms_att": take(layers, dim), "wq": take(layers, dim, dim),
         "wk": take(layers, kv_dim, dim), "wv": take(layers, kv_dim, dim), "wo": take(layers, dim, dim),
         "rms_ffn": take(layers, dim), "w1": take(layers, hidden, dim), "w2": take(layers, dim, hidden),
         "w3": take(layers, hidden, dim), "rms_final": take(dim)}
    offset += seq_len * head_dim  # the legacy RoPE table: unused
    w["classifier"] = w["embedding"] if shared else take(vocab, dim)
    shape = kqsvd.ModelShape(layers, heads, kv_heads, head_dim)
    return shape, w


class Tokenizer:
    """llama2.c's tokenizer.bin and run.c's encoding: BOS, a dummy-prefix space, one token per UTF-8
    character (else byte fallback: byte + 3), then greedy merges of the best-scoring adjacent pair."""

    def __init__(self, path, vocab_size):
        self.pieces, self.scores = [], []
        with open(path, "rb") as f:
            f.read(4)  # max token length
            for _ in range(vocab_size):
                score, length = struct.unpack("<fi", f.read(8))
                self.scores.append(score)
                self.pieces.append(f.read(length))
        self.ids = {piece: i for i, piece in reversed(list(enumerate(self.pieces)))}

    def encode(self, text):
        tokens = [self.ids[b" "]] if text else []
        for char in text:
            piece = char.encode("utf-8")
            if piece in self.ids:
                tokens.append(self.ids[piece])
            else:
                tokens.extend(byte + 3 for byte in piece)
        while True:
            best, best_score = None, -1e10
            for i in range(len(tokens) - 1):
                merged = self.ids.get(self.pieces[tokens[i]] + self.pieces[tokens[i + 1]])
                if merged is not None and self.scores[merged] > best_score:
                    best, best_score = (i, merged), self.scores[merged]
            if best is None:
                return [1] + tokens
            i, merged = best
            tokens[i : i + 2] = [merged]


# ---- the model -------------------------------------------------------------------------------------------


class AttentionTap(torch.nn.Module):
    """The point where a layer's attention inputs exist: rotated q (T x heads*d), rotated k and v
    (T x kv_heads*d). Identity; forward hooks registered on it see the three tensors."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, q, k, v):
        return q, k, v


class Llama2c(torch.nn.Module):
    def __init__(self, path):
        super().__init__()
        self.shape, self.w = load_checkpoint(path)
        self.taps = torch.nn.ModuleList(AttentionTap(l) for l in range(self.shape.layers))
        self.projections = None  # kqsvd.ModelProjections: attention through latents when set

    def rope(self, x, heads):
        """llama2.c run.c: adjacent pairs (2i, 2i+1) turned by position * 10000^(-2i/d)."""
        d = self.shape.head_dim
        t = x.shape[0]
        pairs = x.view(t, heads, d // 2, 2)
        angle = torch.arange(t, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        cos, sin = angle.cos().float()[:, None, :], angle.sin().float()[:, None, :]
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).reshape(t, heads * d)

    def attend(self, layer, q, k, v):
        s, d = self.shape, self.shape.head_dim
        t = q.shape[0]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        out = torch.empty_like(q)
        for h in range(s.query_heads):
            g = h // (s.query_heads // s.kv_heads)
            qh, kh, vh = q[:, h * d : (h + 1) * d], k[:, g * d : (g + 1) * d], v[:, g * d : (g + 1) * d]
            if self.projections is not None:
                keys, values = self.projections.keys(layer, g), self.projections.values(layer, g)
                qh, kh = qh @ torch.tensor(keys.decoder), kh @ torch.tensor(keys.encoder)  # q B, k A
                vh = vh @ torch.tensor(values.encoder)  # v A_v
            scores = (qh @ kh.T) / math.sqrt(d)
            weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
            head = weights @ vh
            if self.projections is not None:
                head = head @ torch.tensor(self.projections.values(layer, g).decoder).T  # decompress
            out[:, h * d : (h + 1) * d] = head
        return out

    @torch.no_grad()
    def forward(self, tokens):
        w, s = self.w, self.shape

        def rmsnorm(x, weight):
            return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5) * weight

        x = w["embedding"][torch.tensor(tokens)]
        for l in range(s.layers):
            h = rmsnorm(x, w["rms_att"][l])
            q = self.rope(h @ w["wq"][l].T, s.query_heads)
            k = self.rope(h @ w["wk"][l].T, s.kv_heads)
            v = h @ w["wv"][l].T
            q, k, v = self.taps[l](q, k, v)
            x = x + self.attend(l, q, k, v) @ w["wo"][l].T
            h = rmsnorm(x, w["rms_ffn"][l])
            x = x + (torch.nn.functional.silu(h @ w["w1"][l].T) * (h @ w["w3"][l].T)) @ w["w2"][l].T
        return rmsnorm(x, w["rms_final"]) @ w["classifier"].T


# ---- calibration, compression, probing -------------------------------------------------------------------


def calibrate(model, stories):
    """Grams of every head through forward hooks: the activations never leave the hook."""
    s, d = model.shape, model.shape.head_dim
    calibration = kqsvd.ModelCalibration(s)

    def hook(tap, inputs, output):
        q, k, v = output
        for h in range(s.kv_heads):
            calibration.add_keys(tap.layer, h, k[:, h * d : (h + 1) * d].numpy())  # a strided view: no copy
            calibration.add_values(tap.layer, h, v[:, h * d : (h + 1) * d].numpy())
        for h in range(s.query_heads):
            calibration.add_queries(tap.layer, h, q[:, h * d : (h + 1) * d].numpy())

    handles = [tap.register_forward_hook(hook) for tap in model.taps]
    try:
        for tokens in stories:
            model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return calibration


def fit(model, calibration, rank):
    weights = [model.w["wo"][l].numpy() for l in range(model.shape.layers)]  # o_proj, for the values
    return kqsvd.ModelProjections.fit(calibration, "kqsvd", key_rank=rank, output_weights=weights)


def mean_kl(model, stories, projections):
    """Mean KL(full || compressed) over every predicted token of the stories."""
    total, count = 0.0, 0
    for tokens in stories:
        model.projections = None
        full = torch.log_softmax(model(tokens)[:-1].double(), -1)
        model.projections = projections
        compressed = torch.log_softmax(model(tokens)[:-1].double(), -1)
        total += (full.exp() * (full - compressed)).sum().item()
        count += full.shape[0]
    model.projections = None
    return total / count


def probe(model, stories, full_rank, rank):
    """Each layer's keys (or values) alone at `rank`, every other projection at full rank (exact):
    w = (KL - KL at full rank) / the layer's predicted squared relative error, summed over its KV heads."""
    s = model.shape
    exact = mean_kl(model, stories, full_rank)
    weights = kqsvd.LossWeights(s, 0.0)
    for layer in range(s.layers):
        for kind in ("key", "value"):
            projections = []
            error = 0.0
            for l in range(s.layers):
                for h in range(s.kv_heads):
                    k, v = full_rank.keys(l, h), full_rank.values(l, h)
                    if l == layer and kind == "key":
                        error += k.predicted_relative_error(rank) ** 2
                        k = k.truncated(rank)
                    if l == layer and kind == "value":
                        error += v.predicted_relative_error(rank) ** 2
                        v = v.truncated(rank)
                    projections.append((k, v))
            increase = max(0.0, mean_kl(model, stories, _Layered(s, projections)) - exact)
            w = increase / error if error > 0 else 0.0
            for h in range(s.kv_heads):
                (weights.set_key if kind == "key" else weights.set_value)(layer, h, w)
    return weights


class _Layered:
    """Per-head projections in the ModelProjections interface the forward pass reads."""

    def __init__(self, shape, pairs):
        self.shape, self.pairs = shape, pairs

    def keys(self, layer, kv_head):
        return self.pairs[layer * self.shape.kv_heads + kv_head][0]

    def values(self, layer, kv_head):
        return self.pairs[layer * self.shape.kv_heads + kv_head][1]


def stories_of(text_path, first, last, tokenizer, max_tokens):
    with open(text_path, encoding="utf-8") as f:
        stories = [s.strip() for s in f.read().split("<|endoftext|>") if s.strip()]
    return [tokenizer.encode(story)[:max_tokens] for story in stories[first:last]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--calib-stories", default="0:50")
    parser.add_argument("--eval-stories", default="2100:2110")
    parser.add_argument("--probe-stories", default="200:208", help="disjoint from the evaluation: the probe's stories")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--sensitivity-out", help="write the probe's loss weights here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = Llama2c(args.model)
    tokenizer = Tokenizer(args.tokenizer, model.w["embedding"].shape[0])
    span = lambda text: tuple(int(x) for x in text.split(":"))
    calib = stories_of(args.text, *span(args.calib_stories), tokenizer, args.max_tokens)
    held_out = stories_of(args.text, *span(args.eval_stories), tokenizer, args.max_tokens)

    reference = kqsvd.reference.logits(args.model, held_out[0])
    ours = model(held_out[0]).numpy()
    print(f"logits vs the C++ reference model on story {args.eval_stories.split(':')[0]}: max |difference| "
          f"{np.abs(ours - reference).max():.2e} (largest logit {np.abs(reference).max():.1f})")
    calibration = calibrate(model, calib)
    full_rank = fit(model, calibration, model.shape.head_dim)
    projections = full_rank.truncated(args.rank, args.rank)
    print(f"calibrated on {calibration.tokens} tokens per head; KQ-SVD rank {args.rank} of {model.shape.head_dim}: "
          f"KL(full || compressed) = {mean_kl(model, held_out, projections):.4f} nats on {len(held_out)} held-out stories")
    if args.sensitivity_out:
        probe_stories = stories_of(args.text, *span(args.probe_stories), tokenizer, args.max_tokens)
        weights = probe(model, probe_stories, full_rank, args.rank)
        kqsvd.write_sensitivity(args.sensitivity_out, weights, method="kqsvd", rope="post",
                                model=args.model.split("/")[-2] if "/" in args.model else args.model,
                                probe=f"examples/python/llama2c_torch.py: each layer alone at rank {args.rank}",
                                overwrite=True)
        print(f"wrote {args.sensitivity_out}")


if __name__ == "__main__":
    main()
