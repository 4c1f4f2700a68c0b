"""Per-sample gradient norms ‖∇θℓᵢ‖ by lightning-gp and by its peers, each as a ratio to a plain step.

Routes (ℓᵢ = per-sample cross-entropy; each route works on its own deep copy of the model, train mode):

- lightning-gp: ``per_sample_grad_norms(model, x, loss_fn, input_norms=False)``: ‖∇θℓᵢ‖ only, what the peers
  compute; the verdict reads this row;
- lightning-gp with ‖∇ₓℓᵢ‖: the default ``per_sample_grad_norms(model, x, loss_fn)``, which also takes the input
  gradient (float inputs), the price of the monitors' ‖∇ₓ‖ column;
- Opacus ghost clipping: ``GradSampleModuleFastGradientClipping(loss_reduction="sum", use_ghost_clipping=True)``,
  the first backward of its ``DPTensorFastGradientClipping`` (``sum(ℓᵢ).backward()``), then ``get_norm_sample()``;
- Opacus GradSampleModule: ``GradSampleModule(loss_reduction="sum")``, ``sum(ℓᵢ).backward()``, then the norm of
  the materialised ``p.grad_sample``;
- BackPACK: ``extend(model)``, ``with backpack(BatchL2Grad()): sum(ℓᵢ).backward()``, √(Σ ``p.batch_l2``);
- torch.func: ``vmap(grad(ℓ))`` over the parameters (``functional_call``), then the norms.

Models: MLP 64→512→512→10, B=256; CNN conv(3→32, 3×3) ReLU maxpool conv(32→64, 3×3) ReLU maxpool
linear(4096→128) ReLU linear(128→10) on (128, 3, 32, 32); a pre-LayerNorm Transformer block on (32, T, 128)
(4 heads, attention from ``nn.Linear`` q/k/v/out projections and an explicit softmax, MLP 128→512→128 GELU,
final LayerNorm, mean over T, linear head to 10) at T=64 with ``LayerNorm(elementwise_affine=False)``, the same
with affine LayerNorm, and T=256 without affine; tiny BERT: ``transformers.BertForSequenceClassification``
from a local ``BertConfig`` (vocab 1000, hidden 128, 2 layers, 2 heads, intermediate 256, eager attention,
dropout 0), token ids (32, 64), explicit (B, T) ``position_ids`` so every embedding sees the batch first.

Method: after warm-up, each route's number of calls per timing is set so one timing lasts ≥ ``--min-ms``. Each
round then times the plain step (forward, mean cross-entropy, backward, ``zero_grad``) and every route once,
in a freshly shuffled order; a route's ratio in that round is its time ÷ that round's plain step. A cell is
the median of its per-round ratios, with the interquartile range over rounds. Agreement: max over samples of
|n − n_ref| / n_ref against a float64 ``torch.func`` reference. A route that cannot handle a model is "n/a".
Verdict (issue 13): lightning-gp ≤ 0.9× the fastest peer on the MLP, CNN, affine-LN block and tiny BERT, and
no slower than any peer at T=256.

Run::

    python -m benchmarks.bench_peers                      # all models, 2 threads (about 3 minutes)
    python -m benchmarks.bench_peers --quick --plot peers.png
    python -m benchmarks.bench_peers --models mlp,cnn --repeats 30
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import random
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from benchmarks.harness import interleaved_rounds, load_note, ratio_stats
from lightning_gp.functional import per_sample_grad_norms

Route = Callable[[], Tensor]
OURS = "lightning-gp"
OURS_WITH_INPUT = "lightning-gp with ‖∇ₓℓᵢ‖"
ROUTES = [
    OURS, OURS_WITH_INPUT, "Opacus ghost clipping", "Opacus GradSampleModule", "BackPACK BatchL2Grad",
    "torch.func vmap",
]
#: models on which lightning-gp must be ≤ 0.9× the fastest peer; on the long sequences no slower than any peer
LEAD_MODELS, LEAD = ("mlp", "cnn", "block-affine", "bert"), 0.9
PAR_MODELS = ("block-256", "linear-512", "hf-128", "hf-512")


# ---------------------------------------------------------------- models


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(z: Tensor) -> Tensor:
            return z.reshape(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5, dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LN Transformer block, then a final LayerNorm, mean over tokens and a linear classifier."""

    def __init__(self, d: int = 128, heads: int = 4, affine: bool = False, classes: int = 10) -> None:
        super().__init__()
        self.ln1, self.ln2, self.ln_f = (nn.LayerNorm(d, elementwise_affine=affine) for _ in range(3))
        self.attn = Attention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return self.head(self.ln_f(x).mean(1))


class Bert(nn.Module):
    """``BertForSequenceClassification`` on token ids → logits (explicit per-sample position ids)."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, inter: int, t: int) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=inter, max_position_embeddings=t, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, num_labels=10, attn_implementation="eager",
        )
        self.bert = BertForSequenceClassification(config)

    def forward(self, ids: Tensor) -> Tensor:
        # contiguous (B, T) position ids: Opacus's embedding norm rule reshapes them with .view
        positions = torch.arange(ids.shape[1], device=ids.device).repeat(ids.shape[0], 1)
        return self.bert(input_ids=ids, position_ids=positions).logits


class HFBlocks(nn.Module):
    """Hugging Face's ``BertEncoder`` (its self-attention and MLP blocks, nn.Linear and affine LayerNorm, eager
    attention, dropout 0) on float inputs (B, T, d), mean over T, a linear head."""

    def __init__(self, hidden: int, layers: int, heads: int, inter: int, classes: int = 10) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=8, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=inter, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            attn_implementation="eager")
        self.encoder = BertModel(config).encoder
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x)[0].mean(1))


class LinearStack(nn.Module):
    """Four Linear(d → d) + GELU on every position of (B, T, d), mean over T, a linear head."""

    def __init__(self, d: int, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(d, d), nn.GELU())])
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).mean(1))


@dataclass
class Case:
    label: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor


def cnn(width: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def build_case(name: str, tiny: bool = False, device: str = "cpu") -> Case:
    """The model, batch and labels of ``name`` on ``device`` (``tiny``: the same architectures on small sizes)."""
    torch.manual_seed(0)
    b = 4 if tiny else None
    if name == "mlp":
        width = 32 if tiny else 512
        model = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                              nn.Linear(width, 10))
        x, label = torch.randn(b or 256, 64), f"MLP 64→{width}→{width}→10, B={b or 256}"
    elif name == "cnn":
        model, x = cnn(4 if tiny else 32), torch.rand(b or 128, 3, 32, 32)
        label = f"CNN (2 conv + 2 linear) on ({b or 128}, 3, 32, 32)"
    elif name.startswith("block"):
        t = (16 if tiny else 256) if name == "block-256" else (8 if tiny else 64)
        d, affine = (16 if tiny else 128), name == "block-affine"
        model, x = Block(d, 4, affine), torch.randn(b or 32, t, d)
        label = f"Transformer block, T={t}, d={d}, B={b or 32}" + (", affine LayerNorm" if affine else "")
    elif name == "bert":
        t = 8 if tiny else 64
        model = Bert(50, 16, 1, 2, 32, t) if tiny else Bert(1000, 128, 2, 2, 256, t)
        x = torch.randint(0, 50 if tiny else 1000, (b or 32, t))
        label = f"tiny BERT (BertForSequenceClassification), T={t}, B={b or 32}"
    elif name == "linear-512":
        d, t = (16, 32) if tiny else (256, 512)
        model, x = LinearStack(d), torch.randn(b or 8, t, d)
        label = f"Linear stack 4 × ({d}→{d}), T={t}, B={b or 8}"
    elif name in ("hf-128", "hf-512"):
        t = int(name.split("-")[1]) // (16 if tiny else 1)
        model = HFBlocks(16, 1, 2, 32) if tiny else HFBlocks(256, 4, 4, 1024)
        x = torch.randn(b or 8, t, 16 if tiny else 256)
        label = f"HF BERT blocks (4 × 256), T={t}, B={b or 8}" if not tiny else f"HF BERT blocks (tiny), T={t}"
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    y = torch.randint(0, 10, (x.shape[0],))
    return Case(label, model.to(device).train(), x.to(device), y.to(device))


MODELS = ["mlp", "cnn", "block", "block-affine", "block-256", "bert", "linear-512", "hf-128", "hf-512"]


# ---------------------------------------------------------------- routes


def ce(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def trainable(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def plain_step(case: Case) -> Route:
    model = copy.deepcopy(case.model)

    def step() -> Tensor:
        loss = ce(model(case.inputs), case.targets).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    return step


def ours(case: Case, input_norms: bool = False) -> Route:
    model = copy.deepcopy(case.model)
    loss_fn = functools.partial(ce, y=case.targets)
    return lambda: per_sample_grad_norms(model, case.inputs, loss_fn, input_norms=input_norms)[1]


def opacus_ghost(case: Case) -> Route:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(
        copy.deepcopy(case.model), loss_reduction="sum", strict=False, use_ghost_clipping=True
    )

    def route() -> Tensor:
        ce(gsm(case.inputs), case.targets).sum().backward()
        norms = gsm.get_norm_sample()
        gsm.zero_grad(set_to_none=True)
        return norms

    return route


def opacus_gsm(case: Case) -> Route:
    from opacus.grad_sample import GradSampleModule

    gsm = GradSampleModule(copy.deepcopy(case.model), loss_reduction="sum", strict=False)
    params = trainable(gsm)

    def route() -> Tensor:
        ce(gsm(case.inputs), case.targets).sum().backward()
        norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params]).norm(dim=0)
        gsm.zero_grad(set_to_none=True)
        return norms

    return route


def backpack_l2(case: Case) -> Route:
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    supported = BatchL2Grad()._BackpropExtension__module_extensions  # BackPACK's own module → rule table
    missing = {type(m).__name__ for m in case.model.modules()
               if any(p.requires_grad for p in m.parameters(recurse=False)) and type(m) not in supported}
    if missing:
        raise NotImplementedError(f"BackPACK has no BatchL2Grad extension for {', '.join(sorted(missing))}")
    model = extend(copy.deepcopy(case.model))
    params = trainable(model)

    def route() -> Tensor:
        with backpack(BatchL2Grad()):
            ce(model(case.inputs), case.targets).sum().backward()
        norms = torch.stack([p.batch_l2 for p in params]).sum(0).sqrt()
        for p in params:
            p.grad = p.batch_l2 = None
        return norms

    return route


def torch_func(case: Case, dtype: torch.dtype | None = None, chunk: int | None = None) -> Route:
    model = copy.deepcopy(case.model)
    inputs = case.inputs
    if dtype is not None:
        model = model.to(dtype)
        inputs = inputs.to(dtype) if inputs.is_floating_point() else inputs
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def loss_one(params: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, params, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0), chunk_size=chunk)

    def route() -> Tensor:
        params = {n: p.detach() for n, p in model.named_parameters() if n in names}
        g = grads(params, inputs, case.targets)
        return torch.stack([g[n].flatten(1).norm(dim=1) for n in names]).norm(dim=0)

    return route


FACTORIES: dict[str, Callable[[Case], Route]] = {
    OURS: ours, OURS_WITH_INPUT: functools.partial(ours, input_norms=True),
    "Opacus ghost clipping": opacus_ghost, "Opacus GradSampleModule": opacus_gsm,
    "BackPACK BatchL2Grad": backpack_l2, "torch.func vmap": torch_func,
}


# ---------------------------------------------------------------- measurement


@dataclass
class Cell:
    ratios: list[float] = field(default_factory=list)
    agreement: float = float("nan")
    na: str | None = None

    @property
    def median(self) -> float:
        return ratio_stats(self.ratios)[0] if self.ratios else float("nan")

    @property
    def iqr(self) -> tuple[float, float]:
        return ratio_stats(self.ratios)[1:]


def _reason(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".splitlines()[0]
    return text if len(text) <= 90 else text[:87] + "..."


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def measure(case: Case, routes: list[str], rounds: int, min_ms: float, warmup: int, rng: random.Random,
            tick: Callable[[], object] | None = None) -> tuple[dict[str, Cell], float]:
    device = case.inputs.device
    """Interleaved rounds: every round times the plain step and each working route once, in a shuffled order.
    Returns the cells and the plain step's median seconds."""
    cells = {name: Cell() for name in routes}
    reference = torch_func(case, torch.float64, chunk=16)().float()
    fns: dict[str, Route] = {"plain": plain_step(case)}
    for name in routes:
        try:
            with _quiet():
                fn = FACTORIES[name](case)
                norms = fn()
            cells[name].agreement = float(((norms.detach() - reference).abs() / reference).max())
            fns[name] = fn
        except Exception as err:  # a route that does not support the model: reported, not timed
            cells[name].na = _reason(err)
    with _quiet():
        times = interleaved_rounds(fns, rounds=rounds, min_ms=min_ms, warmup=warmup, rng=rng, tick=tick,
                                   device=device)
    for name in fns:
        if name != "plain":
            cells[name].ratios = [t / p for t, p in zip(times[name], times["plain"], strict=True)]
    return cells, statistics.median(times["plain"])


# ---------------------------------------------------------------- report


def table(results: dict[str, tuple[str, dict[str, Cell]]], routes: list[str]) -> str:
    lines = [
        "| model | route | × plain (median) | IQR over rounds | max rel. diff vs float64 |",
        "|---|---|---:|---:|---:|",
    ]
    for label, cells in results.values():
        for name in routes:
            c = cells[name]
            if c.na is not None:
                lines.append(f"| {label} | {name} | n/a | | {c.na} |")
                continue
            lo, hi = c.iqr
            lines.append(f"| {label} | {name} | {c.median:.2f} | {lo:.2f}–{hi:.2f} | {c.agreement:.1e} |")
    return "\n".join(lines)


def verdict(results: dict[str, tuple[str, dict[str, Cell]]]) -> str:
    parts = []
    for key, (_, cells) in results.items():
        if key not in LEAD_MODELS + PAR_MODELS or OURS not in cells or cells[OURS].na is not None:
            continue
        peers = {n: c.median for n, c in cells.items() if n not in (OURS, OURS_WITH_INPUT) and c.na is None}
        if not peers:
            continue
        best = min(peers, key=peers.get)
        factor = LEAD if key in LEAD_MODELS else 1.0
        ratio = cells[OURS].median / peers[best]
        ok = ratio <= factor
        parts.append(f"{key}: {ratio:.2f}× {best} (target ≤ {factor:g}×, {'met' if ok else 'NOT met'})")
    return "Verdict, lightning-gp ÷ fastest peer: " + ("; ".join(parts) if parts else "nothing to compare")


def plot(results: dict[str, tuple[str, dict[str, Cell]]], routes: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results)
    width = 0.8 / len(routes)
    fig, ax = plt.subplots(figsize=(1.8 * len(keys) + 2, 4.5))
    for j, name in enumerate(routes):
        xs, ys, errs = [], [], [[], []]
        for i, key in enumerate(keys):
            c = results[key][1][name]
            if c.na is None and c.ratios:
                lo, hi = c.iqr
                xs.append(i + (j - (len(routes) - 1) / 2) * width)
                ys.append(c.median)
                errs[0].append(max(0.0, c.median - lo))
                errs[1].append(max(0.0, hi - c.median))
        ax.bar(xs, ys, width, yerr=errs, label=name, capsize=2)
    ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylabel("time ÷ plain forward+backward (log)")
    ax.set_title(f"Per-sample gradient norms, CPU {torch.get_num_threads()} threads (median, IQR)")
    ax.legend(fontsize=8, ncol=len(routes), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


METHOD = (
    "Method: per model, after warm-up, interleaved rounds; each round times a plain step (forward, mean "
    "cross-entropy, backward, zero_grad) and every route once in a shuffled order, each timing ≥ {min_ms:g} ms "
    "(repeated calls); ratio = route ÷ that round's plain step; cell = median over {rounds} rounds, spread = IQR "
    "(min–max under 4 rounds); agreement = max over samples of |n − n_ref|/n_ref, n_ref from float64 torch.func."
)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (noisier)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per model (default 20; --quick 4)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    parser.add_argument("--min-ms", type=float, default=None, help="least ms per timing (default 40; --quick 15)")
    parser.add_argument("--plot", default=None, metavar="PATH", help="save a bar chart (PNG) there")
    parser.add_argument("--tiny", action="store_true", help="small sizes of the same models (smoke test)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--device", default="cpu", help="where the models run: cpu (default) or cuda")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    for k in keys:
        if k not in MODELS:
            parser.error(f"unknown model {k!r}; choose from {MODELS}")
    rounds = args.repeats or (4 if args.quick else 20)
    min_ms = args.min_ms if args.min_ms is not None else (1.0 if args.tiny else 15.0 if args.quick else 40.0)
    warmup = 1 if args.tiny else 2

    from tqdm import tqdm

    rng = random.Random(0)
    load_before = load_note()
    results: dict[str, tuple[str, dict[str, Cell]]] = {}
    plain_ms: dict[str, float] = {}
    with tqdm(total=rounds * len(keys), desc="bench_peers", disable=args.no_progress, leave=False) as bar:
        for key in keys:
            case = build_case(key, tiny=args.tiny, device=args.device)
            bar.set_postfix_str(key)
            cells, plain = measure(case, ROUTES, rounds, min_ms, warmup, rng, bar.update)
            results[key], plain_ms[key] = (case.label, cells), plain * 1e3
    where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
             else f"CPU ({torch.get_num_threads()} threads)")
    title = f"### {where}: per-sample ‖∇θℓᵢ‖, time ÷ plain forward+backward"
    plain = "Plain step (median ms): " + ", ".join(f"{k} {v:.2f}" for k, v in plain_ms.items())
    if load_before:
        plain += f". Before: {load_before}; after: {load_note(torch.get_num_threads())}."
    out = "\n\n".join([title, METHOD.format(min_ms=min_ms, rounds=rounds), table(results, ROUTES), plain,
                       verdict(results)])
    print(out)
    if args.plot:
        plot(results, ROUTES, args.plot)
        print(f"\nchart: {args.plot}")
    return out


if __name__ == "__main__":
    main()
