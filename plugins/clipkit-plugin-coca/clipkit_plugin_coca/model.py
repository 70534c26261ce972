"""The CoCa model: clipkit's two-tower model plus a multimodal text decoder, and caption generation.

Parameter names and shapes are OpenCLIP's (``text_decoder.resblocks.N``, ``text_decoder.cross_attn.N``,
``text_decoder.ln_final``, ``text_decoder.text_projection``), so its CoCa state dicts load unchanged.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipkit.errors import ClipkitError
from clipkit.layers import LayerScale, ResidualAttentionBlock, make_act, make_norm
from clipkit.model import ClipModel

from . import MultimodalCfg

#: OpenCLIP's defaults for the ids generation starts and stops with: the CLIP tokenizer's.
SOT_ID, EOT_ID = 49406, 49407
GENERATION_TYPES = ("beam_search", "top_k", "top_p")


class CrossAttention(nn.Module):
    """Queries from the text, keys and values from the image tokens; ``nn.MultiheadAttention``'s layout."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        w_q, w_kv = self.in_proj_weight.split([x.shape[-1], 2 * x.shape[-1]])
        b_q, b_kv = self.in_proj_bias.split([x.shape[-1], 2 * x.shape[-1]])
        q = F.linear(x, w_q, b_q)
        k, v = F.linear(context, w_kv, b_kv).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class CrossAttentionBlock(nn.Module):
    """Pre-norm block whose attention reads the image tokens (normalised by ``ln_1_kv``), then an MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, *, ls_init_value: Optional[float],
                 act_layer: Callable[[], nn.Module], norm_layer: Callable[[int], nn.Module]):
        super().__init__()
        self.ln_1 = norm_layer(width)
        self.attn = CrossAttention(width, heads)
        self.ls_1 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ln_1_kv = norm_layer(width)
        self.ln_2 = norm_layer(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", act_layer()),
                                              ("c_proj", nn.Linear(hidden, width))]))
        self.ls_2 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), self.ln_1_kv(context)))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class MultimodalDecoder(nn.Module):
    """Text tokens in, next-token logits out: causal self-attention, then attention to the image tokens."""

    def __init__(self, cfg: MultimodalCfg, vocab_size: int, *, quick_gelu: bool = False):
        super().__init__()
        act, norm = make_act(quick_gelu, None), make_norm(None)
        block = {"ls_init_value": cfg.ls_init_value, "act_layer": act, "norm_layer": norm}
        self.context_length = cfg.context_length
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg.width, cfg.heads, cfg.mlp_ratio, **block)
                                       for _ in range(cfg.layers))
        self.cross_attn = nn.ModuleList(CrossAttentionBlock(cfg.width, cfg.heads, cfg.mlp_ratio, **block)
                                        for _ in range(cfg.layers))
        self.ln_final = norm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, vocab_size))
        nn.init.normal_(self.text_projection, std=cfg.width ** -0.5)

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L, vocab]`` logits of the token after each of ``text_tokens [B, L, width]``."""
        width = self.ln_final.normalized_shape[0]
        for name, tokens in (("image", image_tokens), ("text", text_tokens)):
            if tokens.shape[-1] != width:  # the towers' token widths are only known once they run
                raise ClipkitError(f"the {name} tower's tokens are {tokens.shape[-1]} wide but multimodal_cfg.width "
                                   f"is {width}; they must be equal (with attentional_pool, image tokens are "
                                   f"embed_dim wide)")
        x = text_tokens
        for self_block, cross_block in zip(self.resblocks, self.cross_attn):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self_block, x, None, True, use_reentrant=False)
                x = checkpoint(cross_block, x, image_tokens, use_reentrant=False)
            else:
                x = cross_block(self_block(x, None, True), image_tokens)
        return self.ln_final(x) @ self.text_projection

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable


class CoCa(ClipModel):
    """A :class:`ClipModel` whose towers also return their tokens, with a captioning decoder on top.

    ``forward(image, text)`` returns a dict of the contrastive outputs plus ``logits`` (the decoder's
    prediction of each next token) and ``labels`` (those tokens), whatever ``output_dict`` says, as
    OpenCLIP's CoCa does. As there, ``encode_image`` and ``encode_text`` normalise unless told not to.
    """

    def __init__(self, visual: nn.Module, text: nn.Module, text_decoder: MultimodalDecoder, *, pad_id: int = 0,
                 **clip_kwargs: Any):
        super().__init__(visual, text, **clip_kwargs)
        self.text_decoder = text_decoder
        self.pad_id = pad_id

    @property
    def context_length(self) -> int:
        return self.text_decoder.context_length

    def _image(self, image: torch.Tensor, normalize: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        pooled, tokens = self.visual(image)
        return (F.normalize(pooled, dim=-1) if normalize else pooled), tokens

    def _text(self, text: torch.Tensor, normalize: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        pooled, tokens = self.text(text)
        return (F.normalize(pooled, dim=-1) if normalize else pooled), tokens

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self._image(image, normalize)[0]

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self._text(text, normalize)[0]

    def forward(self, image: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None, *,
                image_latent: Optional[torch.Tensor] = None, image_embs: Optional[torch.Tensor] = None,
                output_labels: bool = True) -> Dict[str, Any]:
        """Features, ``logit_scale`` (and ``logit_bias``), and with both inputs ``logits`` and ``labels``.

        ``image_latent`` and ``image_embs`` (pooled and token image features from an earlier call) skip
        the image tower, as generation does. With ``output_labels`` the last text position is not fed to
        the decoder and ``labels`` are the texts shifted by one (teacher forcing).
        """
        if image is not None and (image_latent is None or image_embs is None):
            image_latent, image_embs = self._image(image)
        out: Dict[str, Any] = {"image_features": image_latent, "text_features": None,
                               "logit_scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        if text is not None:
            out["text_features"], tokens = self._text(text)
            if image_embs is not None:
                if output_labels:
                    tokens = tokens[:, :-1]
                out["logits"] = self.text_decoder(image_embs, tokens)
                if output_labels:
                    out["labels"] = text[:, 1:]
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.text_decoder.set_grad_checkpointing(enable)

    def _next_logits(self, image_latent: torch.Tensor, image_embs: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        _, tokens = self._text(text)
        return self.text_decoder(image_embs, tokens)[:, -1]

    @torch.no_grad()
    def generate(self, image: torch.Tensor, text: Optional[torch.Tensor] = None, seq_len: int = 30,
                 max_seq_len: int = 77, temperature: float = 1.0, generation_type: str = "beam_search",
                 top_p: float = 0.1, top_k: int = 1, pad_token_id: Optional[int] = None,
                 eos_token_id: Optional[int] = None, sot_token_id: Optional[int] = None, num_beams: int = 6,
                 num_beam_groups: int = 3, min_seq_len: int = 5,
                 stopping_criteria: Optional[Sequence[Callable[[torch.Tensor, Any], Any]]] = None,
                 repetition_penalty: float = 1.0, fixed_output_length: bool = False) -> torch.Tensor:
        """Caption token ids ``[B, <= seq_len]`` for ``image``, starting with ``sot_token_id``.

        The arguments are OpenCLIP's ``CoCa.generate``'s, with its meanings: ``generation_type`` is
        ``"beam_search"`` (OpenCLIP's group beam search over the raw decoder scores), ``"top_k"`` (keep
        the ``top_k`` most likely tokens; 1 is greedy) or ``"top_p"`` (keep the most likely tokens whose
        probabilities sum above ``1 - top_p``), sampled with ``torch.multinomial`` after dividing by
        ``temperature``. Generation stops at ``seq_len`` tokens or when every caption has ended; with
        ``fixed_output_length`` shorter captions are padded to ``seq_len``. No transformers needed.
        """
        if generation_type not in GENERATION_TYPES:
            raise ClipkitError(f"generation_type must be one of {', '.join(GENERATION_TYPES)}, "
                               f"got {generation_type!r}")
        if seq_len <= min_seq_len:
            raise ClipkitError(f"seq_len ({seq_len}) must be larger than min_seq_len ({min_seq_len})")
        sot = SOT_ID if sot_token_id is None else sot_token_id
        eos = EOT_ID if eos_token_id is None else eos_token_id
        pad = self.pad_id if pad_token_id is None else pad_token_id
        stops = list(stopping_criteria) if stopping_criteria is not None else [_MaxLength(seq_len)]
        rules = _Rules(min_seq_len, eos, repetition_penalty)
        was_training = self.training
        self.eval()
        try:
            if generation_type == "beam_search":
                ids = _BeamSearch(self, num_beams, num_beam_groups, rules, stops, pad, eos).run(image, sot)
                if fixed_output_length and ids.shape[1] < seq_len:
                    ids = torch.cat([ids, ids.new_full((ids.shape[0], seq_len - ids.shape[1]), pad)], dim=1)
                return ids
            keep = _top_k(top_k) if generation_type == "top_k" else _top_p(top_p)
            return self._sample(image, text, seq_len, max_seq_len, temperature, keep, rules, stops, sot, eos, pad,
                                fixed_output_length)
        finally:
            self.train(was_training)

    def _sample(self, image: torch.Tensor, text: Optional[torch.Tensor], seq_len: int, max_seq_len: int,
                temperature: float, keep: Callable[[torch.Tensor], torch.Tensor], rules: "_Rules",
                stops: List[Callable[[torch.Tensor, Any], Any]], sot: int, eos: int, pad: int,
                fixed_output_length: bool) -> torch.Tensor:
        image_latent, image_embs = self._image(image)
        if text is None:
            text = torch.full((image.shape[0], 1), sot, dtype=torch.long, device=image.device)
        single = text.dim() == 1
        out = text[None] if single else text
        while True:
            window = out[:, -max_seq_len:]
            logits = self._next_logits(image_latent, image_embs, window)
            ended = (out[:, -1] == eos) | (out[:, -1] == pad)
            step = torch.full((out.shape[0], 1), pad, dtype=torch.long, device=out.device)
            if ended.all():
                if not fixed_output_length:
                    break
            else:
                live = ~ended
                scores = keep(rules(window[live], logits[live]))
                if window.shape[1] + 1 == seq_len:  # the last place is the end of every live caption
                    step[live] = eos
                else:
                    step[live] = torch.multinomial(F.softmax(scores / temperature, dim=-1), 1)
            out = torch.cat([out, step], dim=-1)
            if _stopped(stops, out):
                break
        return out[0] if single else out


def _top_k(k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def keep(scores: torch.Tensor) -> torch.Tensor:
        kth = scores.topk(min(max(k, 1), scores.shape[-1])).values[..., -1:]
        return scores.masked_fill(scores < kth, -math.inf)
    return keep


def _top_p(p: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def keep(scores: torch.Tensor) -> torch.Tensor:
        ascending, order = scores.sort(dim=-1)
        # drop the least likely tokens while what they add up to stays within 1 - p; the likeliest stays
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - p
        drop[..., -1] = False
        return scores.masked_fill(drop.scatter(1, order, drop), -math.inf)
    return keep


def _stopped(stops: List[Callable[[torch.Tensor, Any], Any]], ids: torch.Tensor) -> bool:
    """Every caption is stopped by one of the criteria (each says so per caption, or for all at once)."""
    stopped = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for stop in stops:
        stopped |= torch.as_tensor(stop(ids, None), device=ids.device)
    return bool(stopped.all())


class _MaxLength:
    """Stop once the ids are ``length`` long (OpenCLIP's default criterion)."""

    def __init__(self, length: int):
        self.max_length = length

    def __call__(self, ids: torch.Tensor, scores: Any) -> bool:
        return ids.shape[-1] >= self.max_length


class _Rules:
    """What every step applies to the raw scores: no end before ``min_len`` tokens, and the repetition
    penalty (a seen token's score divided by it when positive, multiplied when negative)."""

    def __init__(self, min_len: int, eos: int, penalty: float):
        self.min_len, self.eos, self.penalty = min_len, eos, penalty

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.penalty != 1.0:
            seen = scores.gather(1, ids)
            scores = scores.scatter(1, ids, torch.where(seen < 0, seen * self.penalty, seen / self.penalty))
        if ids.shape[-1] < self.min_len:
            scores = scores.clone()
            scores[:, self.eos] = -math.inf
        return scores


class _Finished:
    """The ended captions of one group of one image: the ``size`` best by score / length."""

    def __init__(self, size: int):
        self.size = size
        self.items: List[Tuple[float, torch.Tensor]] = []
        self.worst = 1e9

    def add(self, ids: torch.Tensor, total: float, length: int) -> None:
        score = total / length
        if len(self.items) < self.size or score > self.worst:
            self.items.append((score, ids))
            if len(self.items) > self.size:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.items))
                del self.items[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def done(self, best_total: float, length: int) -> bool:
        """Full, and no live beam can beat the worst kept caption any more."""
        return len(self.items) >= self.size and self.worst >= best_total / length


class _BeamSearch:
    """OpenCLIP's CoCa beam search: ``groups`` groups of ``beams // groups`` beams per image, each group
    advanced in turn over the raw (processed) decoder scores, finished captions ranked by mean score."""

    def __init__(self, model: CoCa, beams: int, groups: int, rules: _Rules,
                 stops: List[Callable[[torch.Tensor, Any], Any]], pad: int, eos: int):
        if groups < 1 or beams % groups:
            raise ClipkitError(f"num_beams ({beams}) must be a multiple of num_beam_groups ({groups})")
        self.model, self.beams, self.groups, self.size = model, beams, groups, beams // groups
        self.rules, self.stops, self.pad, self.eos = rules, stops, pad, eos

    def run(self, image: torch.Tensor, sot: int) -> torch.Tensor:
        batch, beams, size = image.shape[0], self.beams, self.size
        image = image.repeat_interleave(beams, dim=0)
        image_latent, image_embs = self.model._image(image)
        ids = torch.full((batch * beams, 1), sot, dtype=torch.long, device=image.device)
        finished = [_Finished(size) for _ in range(batch * self.groups)]  # by image, then group
        closed = [False] * len(finished)
        # only each group's first beam starts live, so a group's beams do not all pick the same token
        scores = torch.full((batch, beams), -1e9, device=image.device)
        scores[:, ::size] = 0
        scores = scores.view(-1)
        while True:
            logits = self.model._next_logits(image_latent, image_embs, ids)
            chosen = torch.zeros(batch * beams, dtype=ids.dtype, device=ids.device)
            for group in range(self.groups):
                rows = [b * beams + group * size + i for b in range(batch) for i in range(size)]
                group_ids = ids[rows]
                step = self.rules(group_ids, logits[rows])
                totals = (step + scores[rows].unsqueeze(-1)).view(batch, -1)
                top_totals, top = totals.topk(2 * size, dim=1)
                vocab = step.shape[-1]
                new_scores, tokens, sources = self._advance(group_ids, top_totals, top % vocab, top // vocab,
                                                            group, finished, closed)
                scores[rows] = new_scores
                ids[rows] = group_ids[sources]
                chosen[rows] = tokens
            ids = torch.cat([ids, chosen.unsqueeze(-1)], dim=-1)
            if all(closed) or _stopped(self.stops, ids):
                break
        return self._best(ids, scores, batch, finished, closed)

    def _advance(self, group_ids: torch.Tensor, totals: torch.Tensor, tokens: torch.Tensor, origins: torch.Tensor,
                 group: int, finished: List[_Finished], closed: List[bool]
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image: captions that end go to its finished list; the best ``size`` others stay live."""
        batch, size = totals.shape[0], self.size
        length = group_ids.shape[-1] + 1
        new_scores = torch.zeros(batch, size, dtype=totals.dtype, device=totals.device)
        new_tokens = torch.zeros(batch, size, dtype=tokens.dtype, device=tokens.device)
        sources = torch.zeros(batch, size, dtype=torch.long, device=tokens.device)
        for b in range(batch):
            slot = b * self.groups + group
            if closed[slot]:  # the group has its captions: fill its beams with padding
                new_tokens[b] = self.pad
                continue
            kept = 0
            for rank, (token, total, origin) in enumerate(zip(tokens[b].tolist(), totals[b].tolist(),
                                                              origins[b].tolist())):
                source = b * size + origin
                if token == self.eos:
                    if rank < size:  # an end ranked below the live beams is not a caption of this group
                        finished[slot].add(group_ids[source].clone(), total, length)
                else:
                    new_scores[b, kept], new_tokens[b, kept], sources[b, kept] = total, token, source
                    kept += 1
                if kept == size:
                    break
            closed[slot] = closed[slot] or finished[slot].done(float(totals[b].max()), length)
        return new_scores.view(-1), new_tokens.view(-1), sources.view(-1)

    def _best(self, ids: torch.Tensor, scores: torch.Tensor, batch: int, finished: List[_Finished],
              closed: List[bool]) -> torch.Tensor:
        """The best caption of each image over its groups, ended with ``eos`` when it fits."""
        for slot, group in enumerate(finished):
            if closed[slot]:
                continue
            for i in range(self.size):  # captions still live at the end count as they are
                row = slot * self.size + i
                group.add(ids[row], float(scores[row]), ids.shape[-1])
        best = []
        for b in range(batch):
            candidates = [item for group in finished[b * self.groups:(b + 1) * self.groups] for item in group.items]
            # of equal scores the one added last wins, as in OpenCLIP (a stable sort, then the last)
            best.append(sorted(candidates, key=lambda item: item[0])[-1][1])
        lengths = [len(caption) for caption in best]
        max_length = next((stop.max_length for stop in self.stops if hasattr(stop, "max_length")), None)
        width = min(max(lengths) + 1, max_length) if max_length is not None else max(lengths) + 1
        out = ids.new_full((batch, width), self.pad)
        for b, caption in enumerate(best):
            out[b, :len(caption)] = caption
            if len(caption) < width:
                out[b, len(caption)] = self.eos
        return out


def build_coca(cfg: Any, ctx: Any) -> CoCa:
    """The ``coca`` model family's factory: a text decoder over the towers of ``ctx`` (a ``ModelContext``)."""
    for name, tower in (("vision_cfg", ctx.visual), ("text_cfg", ctx.text)):
        if not getattr(tower, "output_tokens", False):
            raise ClipkitError(f"{name}: a coca model reads the tower's token features; set \"output_tokens\": true")
    # OpenCLIP sizes the logits by text_cfg.vocab_size, with its default for text towers that do not set it
    vocab_size = ctx.config.raw["text_cfg"].get("vocab_size", 49408)
    decoder = MultimodalDecoder(cfg.multimodal_cfg, vocab_size, quick_gelu=ctx.config.top.quick_gelu)
    # OpenCLIP's CoCa pads generated captions with 0, whatever the tokenizer
    return CoCa(ctx.visual, ctx.text, decoder, pad_id=0, **ctx.clip_kwargs())
