"""A latent-conditioned 3D Gaussian avatar: canonical Gaussians + a per-branch decoder.

Every Gaussian has canonical parameters and a learned feature. The decoder turns
(feature, encoded canonical position, z) into deltas of position, rotation, scale, opacity and
colour. It is a sum of branches — one for expression, one per attribute — each seeing only its own
slice of z: moving one attribute's slider can only act through that attribute's branch, which is
the architectural half of disentanglement (the data, where each video edits one attribute, is the
other half). With ``avatar.attribute_composition = "union"`` the attributes' opacity and colour
changes are not added but composed (``union_opacity``, ``dominant_change``), and with "owned" each
attribute also changes only the material it owns (``owned_weights``), so edits never trained
together still look like each edit applied. The number of Gaussians is fixed (DDP never sees
changing shapes); dead ones are relocated onto live ones (see ``relocate.py``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from perse_ray.avatar import fused_compose, fused_mlp
from perse_ray.avatar.layout import LatentLayout
from perse_ray.config import AvatarConfig

# Output channels of every branch and the scale of one unit of output (so the decoder's
# initial learning rate moves each quantity by a sensible amount).
DELTA_CHANNELS = {"mean": 3, "quat": 4, "scale": 3, "opacity": 1, "color": 3}
DELTA_UNITS = {"mean": 0.02, "quat": 0.2, "scale": 0.5, "opacity": 2.0, "color": 2.0}
POSITION_SCALE = 0.25  # metres that map to 1 in the position encoding (a head is ~0.2 m)


def positional_encoding(x: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """[..., 3] → [..., 3 + 6·num_freqs]: x and sin/cos at octave frequencies."""
    freqs = (2.0 ** torch.arange(num_freqs, dtype=x.dtype, device=x.device)) * math.pi
    angles = x[..., None] * freqs  # [..., 3, F]
    return torch.cat([x, angles.sin().flatten(-2), angles.cos().flatten(-2)], dim=-1)


def ellipsoid_points(n: int, radii: tuple[float, float, float], generator: torch.Generator) -> torch.Tensor:
    """``n`` points spread evenly (Fibonacci sphere) on an ellipsoid, jittered slightly inward."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    phi = torch.acos(1 - 2 * i / n)
    theta = math.pi * (1 + 5 ** 0.5) * i
    unit = torch.stack([torch.sin(phi) * torch.cos(theta), torch.cos(phi), torch.sin(phi) * torch.sin(theta)], -1)
    depth = 1 - 0.15 * torch.rand(n, 1, generator=generator, dtype=torch.float64)
    return (unit * depth * torch.tensor(radii, dtype=torch.float64)).float()


class BranchDecoder(nn.Module):
    """Sum of small MLPs, one per latent branch, evaluated once per distinct branch input.

    Within a batch most frames share most attribute codes (a frame edits one attribute), so each
    branch runs on the unique rows of its z-slice only and is gathered back: the cost grows with
    the number of distinct codes, not with the batch size. A branch given the indices of the
    Gaussians it may move (its region) runs on those only and adds nothing elsewhere.
    """

    def __init__(self, gauss_dim: int, branch_dims: list[int], hidden: int, layers: int):
        super().__init__()
        nb, zmax = len(branch_dims), max(branch_dims)
        self.branch_dims = list(branch_dims)
        out = sum(DELTA_CHANNELS.values())

        def init(*shape, fan_in):
            return nn.Parameter(torch.randn(*shape) * (2.0 / fan_in) ** 0.5)

        self.w_gauss = init(nb, gauss_dim, hidden, fan_in=gauss_dim + zmax)
        self.w_z = init(nb, zmax, hidden, fan_in=gauss_dim + zmax)
        self.b_in = nn.Parameter(torch.zeros(nb, hidden))
        self.w_hidden = nn.ParameterList([init(nb, hidden, hidden, fan_in=hidden) for _ in range(layers - 1)])
        self.b_hidden = nn.ParameterList([nn.Parameter(torch.zeros(nb, hidden)) for _ in range(layers - 1)])
        # Zero output layer: the untrained avatar is exactly its canonical Gaussians.
        self.w_out = nn.Parameter(torch.zeros(nb, hidden, out))
        self.b_out = nn.Parameter(torch.zeros(nb, out))

    def forward(self, gauss_in: torch.Tensor, z_branches: list[torch.Tensor],
                groups: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                regions: list[torch.Tensor | None] | None = None,
                anchored: list[bool] | None = None, l1_of: list[bool] | None = None,
                parts: list[int] | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """gauss_in [N, G], z_branches[b] [B, d_b] → summed deltas [B, N, out].

        ``groups[b]`` = (inverse [B], first [U]) names branch b's distinct rows (see ``row_groups``);
        given, the decoder never looks at z's values, which on CUDA is a host sync per branch.
        ``regions[b]``: indices of the Gaussians branch b acts on (None: all of them).
        ``anchored[b]``: branch b outputs f(z) − f(0), and exactly zero on rows where z is all zeros.
        ``l1_of[b]``: also return the sum over those branches of their mean |output| per distinct row,
        Gaussian and channel (Gaussians outside a branch's region count as zeros): (deltas, l1).
        ``parts[b]``: the part branch b is summed into; given, the deltas are a list of P [B, N, out],
        one sum per part (the union opacity composes the parts' opacities, see ``union_opacity``). A
        list, not a stack: slicing a stacked [P, B, N, out] apart costs a zero-filled copy of the
        whole stack per slice in the backward, about a tenth of the decoder's time at the cpu preset.
        """
        nb, g_dim, hidden = self.w_gauss.shape
        regions = regions or [None] * nb
        anchored = anchored or [False] * nb
        # Anchored branches (added after training) stay out of the fused product: a wider matrix may
        # round the other branches' columns differently, and their renders must not move by a bit.
        full = [b for b in range(nb) if regions[b] is None and not anchored[b]]
        # The input projection of every all-Gaussian branch in one matrix product; parameters are
        # unbound once so no per-branch slice back-propagates a zero-filled copy of the stack.
        w_gauss, w_z, b_in, w_out, b_out = (t.unbind(0) for t in (self.w_gauss, self.w_z, self.b_in,
                                                                   self.w_out, self.b_out))
        g_full = dict(zip(full, (gauss_in @ torch.cat([w_gauss[b] for b in full], 1)).split(hidden, 1))) \
            if full else {}
        w_hidden = [(w.unbind(0), bias.unbind(0)) for w, bias in zip(self.w_hidden, self.b_hidden)]
        batch = z_branches[0].shape[0]
        l1 = gauss_in.new_zeros(()) if l1_of is not None else None
        part_of = parts or [0] * nb
        zeros = lambda: gauss_in.new_zeros(batch, gauss_in.shape[0], self.w_out.shape[-1])  # noqa: E731
        totals = [zeros() if any(r is not None for r in regions) else None for _ in range(max(part_of) + 1)]
        for b, z in enumerate(z_branches):
            inverse, first = groups[b] if groups is not None else row_groups(z.detach())
            index = regions[b]
            if index is not None and index.numel() == 0:
                continue
            g = g_full[b] if b in g_full else (gauss_in if index is None else gauss_in[index]) @ w_gauss[b]  # [n_b, H]
            zu = z[first]  # differentiable representatives of the distinct rows
            if anchored[b]:
                at_source = (zu.detach() == 0).all(1)
                # On the host the rows are free to read: a row already at the source serves as the anchor
                # f(0), and a branch at its source on every row adds nothing. On a GPU that is a host sync.
                known = zu.device.type == "cpu"
                if known and bool(at_source.all()):
                    continue
                anchor = int(at_source.nonzero()[0, 0]) if known and bool(at_source.any()) else len(zu)
                if anchor == len(zu):
                    zu = torch.cat([zu, zu.new_zeros(1, zu.shape[1])])  # f(0) as one more row
            zp = zu @ w_z[b][: z.shape[1]] + b_in[b]  # [U, H]
            if not w_hidden and _fused_here(g):
                out = fused_mlp.silu_mlp(g, zp, w_out[b], b_out[b])  # [U, n_b, out], no [U, n_b, H] kept
            else:
                h = nn.functional.silu(g[None] + zp[:, None])  # [U, n_b, H]
                for w, bias in w_hidden:
                    h = nn.functional.silu(h @ w[b] + bias[b])
                out = h @ w_out[b] + b_out[b]  # [U, n_b, out]
            if anchored[b]:
                # Zero where z is the source code by construction, not by rounding: f(0) − f(0) computed
                # in two places need not cancel bit for bit.
                u = len(at_source)
                out = torch.where(at_source[:, None, None], torch.zeros_like(out[:u]), out[:u] - out[anchor:anchor + 1])
            if l1_of is not None and l1_of[b]:
                l1 = l1 + out.abs().sum() / (out.shape[0] * gauss_in.shape[0] * out.shape[2])
            out = out[inverse] if out.shape[0] > 1 or inverse.shape[0] > 1 else out.expand(batch, -1, -1)
            p, total = part_of[b], totals[part_of[b]]
            if index is not None:
                totals[p] = total.index_add(1, index, out)
            else:
                totals[p] = out if total is None else total + out
        total = totals[0] if parts is None else [zeros() if t is None else t for t in totals]
        return total if l1_of is None else (total, l1)


def _fused_here(t: torch.Tensor) -> bool:
    """Whether the one-hidden-layer branches run on the fused CPU kernel (``fused_mlp``): float32 on
    the CPU where it builds (an AVX2 CPU with a C++ compiler); elsewhere torch's ops, the same sums."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and fused_mlp.available()


def _fused_compose_here(t: torch.Tensor, color_dominance: float) -> bool:
    """Whether the union/owned composition runs on the fused CPU kernel (``fused_compose``): at colour
    dominance 0, float32 on the CPU where it builds; elsewhere torch's ops below, the same sums."""
    return (color_dominance == 0 and t.device.type == "cpu" and t.dtype == torch.float32
            and fused_compose.available())


def _union_terms(logits: torch.Tensor, attribute_deltas) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``union_opacity``'s terms: log of the share of the source's opacity every lowering keeps
    (summed), and per attribute the log of the share of the rest its raising leaves clear."""
    keep, clears = torch.zeros_like(logits), []
    for delta in attribute_deltas:  # in order, so an attribute added later at its source (exact zeros) changes no bit
        # split so that the gradient at exactly 0 (a zero-initialised output layer) is sigmoid's, not
        # lost between the two sides as clamp's would be
        lower = torch.where(delta <= 0, delta, torch.zeros_like(delta))
        keep = keep + (nn.functional.logsigmoid(logits + lower) - nn.functional.logsigmoid(logits))
        clears.append(nn.functional.logsigmoid(-logits - (delta - lower)) - nn.functional.logsigmoid(-logits))
    return keep, clears


def union_opacity(logits: torch.Tensor, attribute_deltas: torch.Tensor) -> torch.Tensor:
    """Opacity when every attribute's edit is applied at once, as a union of what each one does.

    logits [B, N]: canonical plus expression; attribute_deltas [A, B, N] in logit units. Alone, an
    attribute gives exactly sigmoid(logits + delta). Together, what lowers opacity multiplies the
    opacity (keep = o_a / o), what raises it covers what is left (1 − o_a = (1 − o)(1 − add)), so
    a Gaussian one edit turns on (glasses) stays on where another edit fades it (hair over the brows);
    a sum of logits would let the second cancel the first.
    """
    return _union_opacity(logits, *_union_terms(logits, attribute_deltas))


def _union_opacity(logits: torch.Tensor, keep: torch.Tensor, clears: list[torch.Tensor]) -> torch.Tensor:
    return 1 - (1 - torch.sigmoid(logits) * keep.exp()) * sum(clears, torch.zeros_like(logits)).exp()


def owned_weights(logits: torch.Tensor, attribute_deltas: torch.Tensor) -> torch.Tensor:
    """[A, B, N]: the share of a Gaussian's material each attribute may change ("owned" composition).

    The union opacity is made of the source's material (its opacity after every lowering) and what
    each attribute adds. Attribute a moves and recolours the source's material and its own,
    (source + add_a) / (source + Σ add): lenses the glasses add keep their place and colour where the
    hair or beard edit changes the face behind them. Alone (every other change exactly zero) an
    attribute's share is exactly 1.
    """
    return _owned_shares(logits, *_union_terms(logits, attribute_deltas))


def _owned_shares(logits: torch.Tensor, keep: torch.Tensor, clears: list[torch.Tensor]) -> torch.Tensor:
    source = torch.sigmoid(logits) * keep.exp()
    adds = [-torch.expm1(clear) for clear in clears]
    total = source
    for add in adds:  # in order: a later attribute at its source adds exact zeros
        total = total + add
    tiny = torch.finfo(total.dtype).tiny  # an invisible Gaussian (no material at all) keeps share 1
    return torch.stack([torch.where(total > tiny, (source + add) / total.clamp_min(tiny), torch.ones_like(total))
                        for add in adds])


def dominant_change(changes: torch.Tensor, dominance: float) -> torch.Tensor:
    """Attributes' colour changes [A, B, N, 3] (logits) → one change [B, N, 3], the largest favoured.

    Each change is weighted by exp(dominance · (|change| − the largest |change|)): alone (or as the
    largest) a change counts in full, so a single edit is exact; where two edits recolour one
    Gaussian (dark lenses over brows the hair edit lightens) the weaker one yields by how much
    smaller it is. Dominance 0 adds them, as the sum composition does.
    """
    size = (changes.square().sum(-1, keepdim=True) + 1e-12).sqrt()
    weight = torch.exp(dominance * (size - size.amax(0, keepdim=True)))
    out = torch.zeros_like(changes[0])
    for w, change in zip(weight, changes):  # in order: an attribute added later at its source changes no bit
        out = out + w * change
    return out


def row_groups(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct rows of ``rows`` [B, d]: (inverse [B] into them, first [U] = a row index of each)."""
    uniq, inverse = torch.unique(rows, dim=0, return_inverse=True)
    first = torch.full((uniq.shape[0],), rows.shape[0], dtype=torch.long, device=rows.device)
    first = first.scatter_reduce(0, inverse, torch.arange(rows.shape[0], device=rows.device), "amin")
    return inverse, first


class AvatarModel(nn.Module):
    def __init__(self, layout: LatentLayout, cfg: AvatarConfig, seed: int = 0):
        super().__init__()
        self.layout, self.cfg = layout, cfg
        gen = torch.Generator().manual_seed(seed)
        n = cfg.num_gaussians
        r = cfg.init_radius
        self.means = nn.Parameter(ellipsoid_points(n, (r, 1.25 * r, r), gen))
        self.log_scales = nn.Parameter(torch.full((n, 3), math.log(cfg.init_scale)))
        quats = torch.randn(n, 4, generator=gen)
        self.quats = nn.Parameter(quats / quats.norm(dim=-1, keepdim=True))
        self.opacity_logits = nn.Parameter(torch.full((n,), math.log(0.5 / 0.5)))
        self.color_logits = nn.Parameter(torch.zeros(n, 3))
        self.features = nn.Parameter(0.1 * torch.randn(n, cfg.feature_dim, generator=gen))
        # Learned codes of edits 1..K-1 per attribute; edit 0 (the source) is the zero code.
        self.codes = nn.ParameterDict({
            a.name: nn.Parameter(0.1 * torch.randn(a.num_edits - 1, a.code_dim, generator=gen))
            for a in layout.attributes})
        gauss_dim = cfg.feature_dim + 3 + 6 * cfg.pos_freqs
        self.decoder = BranchDecoder(gauss_dim, layout.branch_dims(), cfg.hidden_dim, cfg.hidden_layers)
        if cfg.branch_regions:
            # Which Gaussians each attribute branch may move (row = attribute); set by training
            # from the edits' masks (``set_branch_regions``). All at first: no restriction.
            self.register_buffer("branch_regions", torch.ones(len(layout.attributes), n, dtype=torch.bool))
        self._regions_key, self._regions = None, None
        # Learned screen-space backdrop: the 2D animator keeps the photo's background fixed to the
        # camera, so it is not part of the 3D head. Stored as logits, bilinearly resized on render.
        self.backdrop = nn.Parameter(torch.zeros(3, cfg.backdrop_res, cfg.backdrop_res)) if cfg.backdrop else None

    # ----------------------------------------------------------------- latents

    def code_table(self, name: str) -> torch.Tensor:
        """[K, code_dim] codes of attribute ``name``, row 0 = the source (zeros)."""
        codes = self.codes[name]
        return torch.cat([codes.new_zeros(1, codes.shape[1]), codes], dim=0)

    def compose(self, expression: torch.Tensor, selections: torch.Tensor) -> torch.Tensor:
        """Latents for a batch of frames.

        expression [B, E]; selections [B, A, 3] = (from_edit, to_edit, alpha) per attribute, so
        an attribute's code is lerp(code[from], code[to], alpha) — an edited frame is (k, k, 0)
        and a slider value s is (floor s, ceil s, frac s).
        """
        parts = [expression]
        for i, a in enumerate(self.layout.attributes):
            table = self.code_table(a.name)
            lo, hi = selections[:, i, 0].long(), selections[:, i, 1].long()
            alpha = selections[:, i, 2:3].to(table.dtype)
            parts.append(table[lo] * (1 - alpha) + table[hi] * alpha)
        return torch.cat(parts, dim=-1)

    def slider_selection(self, attributes: dict[str, float]) -> torch.Tensor:
        """[A, 3] selection for slider values (missing attributes stay at the source)."""
        rows = []
        for a in self.layout.attributes:
            s = float(attributes.get(a.name, 0.0))
            lo = min(int(math.floor(s)), a.num_edits - 1)
            hi = min(lo + 1, a.num_edits - 1)
            rows.append([lo, hi, s - lo])
        return torch.tensor(rows, dtype=torch.float32).reshape(len(self.layout.attributes), 3)

    # ----------------------------------------------------------------- decoding

    def region_indices(self) -> list[torch.Tensor | None] | None:
        """Per decoder branch, the Gaussians it acts on (None: all); cached until the mask changes."""
        mask = getattr(self, "branch_regions", None)
        if mask is None:
            return None
        key = (mask.data_ptr(), mask._version, mask.device)
        if key != self._regions_key:
            rows = {a.name: None if bool(m.all()) else torch.nonzero(m).flatten()
                    for a, m in zip(self.layout.attributes, mask)}
            # the expression branch moves all; an attribute's residual branches share its region
            self._regions_key = key
            self._regions = [None if b.input == "expression" else rows[b.input] for b in self.layout.branches()]
        return self._regions

    @torch.no_grad()
    def set_branch_regions(self, mask: torch.Tensor) -> None:
        """mask [A, N] bool: attribute a's branch acts only where mask[a] is true."""
        self.branch_regions.copy_(mask)

    def latent_groups(self, expression: torch.Tensor, selections: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``compose``'s inputs → each decoder branch's distinct rows (``row_groups``), from values
        the trainer holds on the CPU anyway: the decoder then needs no look at z on the device."""
        index = {a.name: i for i, a in enumerate(self.layout.attributes)}
        exp = expression if self.layout.exp_dim else expression.new_zeros(expression.shape[0], 1)
        groups = {name: row_groups(selections[:, i]) for name, i in index.items()}
        groups["expression"] = row_groups(exp)
        return [groups[b.input] for b in self.layout.branches()]

    def gaussians(self, z: torch.Tensor, groups: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                  attribute_l1: bool = False) -> dict[str, torch.Tensor]:
        """Decode latents z [B, dim] into activated Gaussians, each [B, N, ...]. ``groups``: see
        ``latent_groups`` (found from z when not given). ``attribute_l1`` adds "attribute_l1", the
        attribute branches' mean |output| (``BranchDecoder.forward``'s ``l1_of``), for a prior."""
        slices = self.layout.slices()
        if not self.layout.exp_dim:
            slices["expression"] = None
        layout_branches = self.layout.branches()
        branches = [z.new_zeros(z.shape[0], 1) if slices[b.input] is None else z[:, slices[b.input]]
                    for b in layout_branches]
        pos = positional_encoding(self.means.detach() / POSITION_SCALE, self.cfg.pos_freqs)
        if groups is not None:
            groups = [(i.to(z.device, non_blocking=True), f.to(z.device, non_blocking=True)) for i, f in groups]
        union = self.cfg.attribute_composition in ("union", "owned")
        # union: one part for the expression and one per attribute (its residual branches with it)
        attribute_index = {a.name: i for i, a in enumerate(self.layout.attributes)}
        parts = [0 if b.input == "expression" else 1 + attribute_index[b.input] for b in layout_branches] \
            if union else None
        out = self.decoder(torch.cat([self.features, pos], dim=-1), branches, groups, self.region_indices(),
                           [b.anchored for b in layout_branches],
                           [b.input != "expression" for b in layout_branches] if attribute_l1 else None, parts)
        deltas, l1 = out if attribute_l1 else (out, None)
        fused = union and _fused_compose_here(deltas[0], self.cfg.color_dominance)
        if fused:  # the union branch below in one compiled pass, the same sums
            expression = deltas[0]
            attributes = torch.stack(deltas[1:]) if len(deltas) > 1 else expression.new_zeros(0, *expression.shape)
            d_mean, d_quat, d_scale, opacities, colors = fused_compose.compose_parts(
                self.opacity_logits, self.color_logits, expression, attributes,
                self.cfg.attribute_composition == "owned", DELTA_UNITS["opacity"], DELTA_UNITS["color"])
            d = {"mean": d_mean, "quat": d_quat, "scale": d_scale}
        elif union:
            expression, attributes = deltas[0], deltas[1:]  # [B, N, 14] each
            logits = self.opacity_logits + DELTA_UNITS["opacity"] * expression[..., 10]  # channel 10: opacity
            keep, clears = _union_terms(logits, [DELTA_UNITS["opacity"] * part[..., 10] for part in attributes])
            opacities = _union_opacity(logits, keep, clears)
            if self.cfg.attribute_composition == "owned":  # each attribute changes only the material it owns
                shares = _owned_shares(logits, keep, clears)
                attributes = [share[..., None] * part for share, part in zip(shares, attributes)]
            deltas = sum(attributes, expression)  # the geometry: every part's deltas added, in order
            changes = torch.stack([DELTA_UNITS["color"] * part[..., 11:14] for part in attributes])
            colors = torch.sigmoid(self.color_logits + DELTA_UNITS["color"] * expression[..., 11:14]
                                   + dominant_change(changes, self.cfg.color_dominance))
        if not fused:
            d = dict(zip(DELTA_CHANNELS, deltas.split(list(DELTA_CHANNELS.values()), dim=-1)))
        if not union:
            opacities = torch.sigmoid(self.opacity_logits + DELTA_UNITS["opacity"] * d["opacity"][..., 0])
            colors = torch.sigmoid(self.color_logits + DELTA_UNITS["color"] * d["color"])
        g = {
            "means": self.means + DELTA_UNITS["mean"] * d["mean"],
            "quats": self.quats + DELTA_UNITS["quat"] * d["quat"],
            "scales": torch.exp(self.log_scales + DELTA_UNITS["scale"] * d["scale"]),
            "opacities": opacities,
            "colors": colors,
        }
        if l1 is not None:
            g["attribute_l1"] = l1
        return g

    def render(self, z: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int, *,
               background: torch.Tensor | None = None, backend: str = "auto", groups=None,
               attribute_l1: bool = False):
        """z [B, dim], viewmats [B, C, 4, 4], Ks [B, C, 3, 3] → (rgb [B, C, H, W, 3], alpha, gaussians).

        ``background`` [3] replaces the learned backdrop (e.g. a plain colour for serving).
        """
        from perse_ray.render import rasterize

        g = self.gaussians(z, groups, attribute_l1)
        rgb, alpha, _ = rasterize(g["means"], g["quats"], g["scales"], g["opacities"], g["colors"],
                                  viewmats, Ks, width, height, backend=backend)
        if background is not None:
            back = background.to(rgb).reshape(1, 1, 1, 1, 3)
        elif self.backdrop is not None:
            back = torch.sigmoid(nn.functional.interpolate(self.backdrop[None], size=(height, width),
                                                           mode="bilinear", align_corners=False))
            back = back[0].permute(1, 2, 0)[None, None]
        else:
            back = rgb.new_tensor(self.cfg.background).reshape(1, 1, 1, 1, 3)
        return rgb + (1 - alpha) * back, alpha, g
