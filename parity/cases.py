"""The parity grid: models x user types x server buffers x defences, plus the special cases."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Optional

VISION_MODELS = ("linear", "MLP", "lenet_zhu", "ConvNetSmall", "ConvNet", "cnn6", "resnet18", "resnet20")
TEXT_MODELS = ("linear-text", "transformer3")
# The rest of breaching's text zoo: full grid only, one defence (the fixed-position models hold a
# buffer, their sinusoidal table, so for them "buffers sent" is a case of its own).
TEXT_ZOO_MODELS = ("transformer1", "transformerS", "transformer3f", "transformer3t", "LSTM")
FIXED_POSITION_MODELS = ("transformer1", "transformerS", "transformer3f")
# breaching's Hugging Face text models with their data task: the dropout-free aliases (train-mode
# users draw no masks), tiny configs from a generated hub cache (parity.reference.use_tiny_hf_cache).
HF_TEXT_MODELS = {"bert-sanity-check": "masked-lm", "gpt2S": "causal-lm"}
USERS = ("local_gradient", "local_update", "aggregate")
DEFENCES = ("none", "clip", "input_noise", "gradient_noise")

# float32 bound on the relative error of gradients/deltas (max abs error / max |reference|).
FLOAT32_BOUND = 1e-5
FLOAT64_BOUND = 1e-10
# A float32 case that misses its bound still passes if our result is no further from the
# reference's own float64 result than twice the reference's float32 result is (see
# fedjax_users.interop.parity_check.check_parity): several SGD steps amplify rounding in both frameworks alike.
# Failing that, it passes if our distance is within twice the worst distance of the reference's
# float32 runs on weights/inputs perturbed by 5e-7 (interop.parity_check.SPREAD_PERTURBATION): ConvNet's gradient is
# discontinuous at float32 resolution (ReLU kinks of pre-activations within ~1e-6 of zero), so a
# single float32 run of the reference lands 1.5e-6 or 1e-2 from float64 depending on chance.
# ConvNetSmall's 15M parameters sit in wide convolutions (256 -> 512 -> 1024 channels) whose
# weight gradients sum 4096 products per entry; under ``vmap`` over users XLA runs them as grouped
# convolutions with another float32 accumulation order, and the parameter difference loses digits
# to cancellation (deltas ~1e-4 of weights ~2e-2). Its aggregate lands at 1.7e-5; the same model's
# aggregate in float64 (in the float64 grid) meets 1e-10, so this is rounding, not semantics.
MODEL_BOUNDS: dict[str, float] = {"ConvNetSmall": 3e-5}
# Ten times breaching's default: deltas well above float32 cancellation, and small enough that
# the noise of one step barely changes the next step's gradient (so noise residuals are the
# summed noise) and that no eval-mode case diverges.
LOCAL_LEARNING_RATE = 1e-2
# ConvNet in eval mode (server buffers) diverges at 1e-2 in both frameworks (largest parameter
# change 2.9e-2, 31, 1.1e31 after steps 1-3 of the reference): a comparison of overflowing
# numbers says nothing. breaching's default 1e-3 keeps its steps bounded (2.9e-3, 1.1e-2, 1.0e-2).
# breaching's ResNet32-10 and ResNet50 (CIFAR stems) and torchvision's resnet50 in eval mode diverge
# the same way at 1e-2 (the reference's parameter differences reach 1.3e11 in float32 and 7.4e243 in
# float64 after three steps; resnet50's are NaN) and stay finite at 1e-3 (their grid cases pass).
# DenseNet121's eval-mode float64 aggregate at 1e-2 reached 3.5e8 in the reference (its row's
# detail in `git show cf75544:results/parity_zoo.json`), so it trains at 1e-3 as well.
MODEL_LEARNING_RATES: dict[str, float] = {"ConvNet": 1e-3, "ResNet32-10": 1e-3, "ResNet50": 1e-3, "resnet50": 1e-3,
                                          "DenseNet121": 1e-3}


@dataclasses.dataclass(frozen=True)
class Case:
    """One comparison; ``user_overrides`` are breaching user-YAML keys."""

    model: str
    user: str
    buffers_sent: bool
    defence: str = "none"
    precision: str = "float32"
    num_examples: int = 4
    num_users: int = 3
    queries: int = 1
    tag: str = ""
    user_overrides: tuple = ()
    seed: int = 0
    num_classes: int = 10
    image_shape: tuple = (3, 32, 32)
    # breaching's ``cfg_data.name``: data named ``*ImageNet*`` takes torchvision's models.
    data_name: str = "CIFAR10"
    vocab_size: int = 50
    seq_len: int = 8

    @property
    def is_text(self) -> bool:
        """Text models get token users and the causal-LM loss."""
        return self.model in TEXT_MODELS or self.model in TEXT_ZOO_MODELS or self.model in HF_TEXT_MODELS

    @property
    def task(self) -> str:
        """breaching's ``data.task``: what picks a Hugging Face model's class and the loss."""
        return HF_TEXT_MODELS.get(self.model, "causal-lm" if self.is_text else "classification")

    @property
    def name(self) -> str:
        """Readable identifier used in the report."""
        model = self.model if self.data_name == "CIFAR10" else f"{self.model}@{self.data_name}"
        parts = [model, self.user, "buffers" if self.buffers_sent else "no-buffers", self.defence]
        if self.precision != "float32":
            parts.append(self.precision)
        if self.tag:
            parts.append(self.tag)
        return "/".join(parts)

    @property
    def bound(self) -> float:
        """The relative-error bound this case must meet."""
        if self.precision == "float64":
            return FLOAT64_BOUND
        return MODEL_BOUNDS.get(self.model, FLOAT32_BOUND)

    def user_config(self) -> dict:
        """breaching user keys for this case (all provide_* on unless overridden)."""
        multi = self.user == "local_update" or (self.user == "aggregate" and self.tag != "single-step")
        cfg = dict(
            user_type={"local_gradient": "local_gradient", "local_update": "local_update",
                       "aggregate": "multiuser_aggregate"}[self.user],
            num_data_points=self.num_examples,
            provide_buffers=True,
            provide_labels=True,
            provide_num_data_points=True,
            local_diff_privacy=dict(gradient_noise=0.0, input_noise=0.0, distribution="laplacian",
                                    per_example_clipping=0.0),
        )
        if self.user == "aggregate":
            cfg["user_range"] = [0, self.num_users]
        if multi or self.user == "aggregate":
            cfg.update(num_local_updates=3 if multi else 1, num_data_per_local_update_step=2,
                       local_learning_rate=MODEL_LEARNING_RATES.get(self.model, LOCAL_LEARNING_RATE),
                       provide_local_hyperparams=True)
        overrides = dict(self.user_overrides)
        ldp = overrides.pop("local_diff_privacy", None)
        if ldp:
            cfg["local_diff_privacy"] = {**cfg["local_diff_privacy"], **ldp}
        cfg.update(overrides)
        return cfg


def _grid(models, precision="float32", defences=DEFENCES) -> list[Case]:
    cases = []
    for model, user, buffers, defence in itertools.product(models, USERS, (False, True), defences):
        if model in ("linear", "MLP", "lenet_zhu", "ConvNetSmall", "cnn6") and buffers and defence != "none":
            # No BatchNorm: "buffers sent" only flips the (empty) eval mode; one case per user shows it.
            continue
        cases.append(Case(model, user, buffers, defence, precision=precision))
    return cases


def _special(models=("ConvNet", "resnet20")) -> list[Case]:
    cases = []
    for model in models:
        # Ragged steps: 5 points, 2 per step, 4 steps -> [0,1], [2,3], [4], [1,2].
        ragged = (("num_local_updates", 4), ("num_data_per_local_update_step", 2))
        cases.append(Case(model, "local_update", False, num_examples=5, tag="ragged", user_overrides=ragged))
        cases.append(Case(model, "aggregate", False, num_examples=5, tag="ragged", user_overrides=ragged))
        # A second query on the same user: its own BatchNorm state persists.
        for user in ("local_gradient", "local_update"):
            cases.append(Case(model, user, False, queries=2, tag="second-query"))
        cases.append(Case(model, "local_gradient", False, defence="clip", queries=2, tag="second-query"))
        # provide_* flags off.
        off = (("provide_buffers", False), ("provide_labels", False), ("provide_num_data_points", False),
               ("provide_local_hyperparams", False))
        for user in USERS:
            cases.append(Case(model, user, False, tag="provide-off", user_overrides=off))
        cases.append(Case(model, "aggregate", False, tag="single-step"))
        cases.append(Case(model, "aggregate", True, tag="single-step"))
    return cases


def _chunked(buffers=(False,), precision="float32") -> list[Case]:
    """Clipping users with enough examples that they run in chunks of examples (clipping.auto_examples_per_chunk):
    lenet_zhu's 80 in 2 chunks (3 in float64), resnet20's 40 in 2, its train-mode statistics folded across them."""
    return [Case("lenet_zhu", "local_gradient", False, "clip", precision=precision, num_examples=80, tag="chunked")] + [
        Case("resnet20", "local_gradient", b, "clip", precision=precision, num_examples=40, tag="chunked")
        for b in buffers
    ]


def _text(precision="float32") -> list[Case]:
    return [Case(model, user, False, defence, precision=precision, num_examples=4)
            for model in TEXT_MODELS for user in USERS for defence in ("none", "clip", "gradient_noise")]


def _hf_text(precision="float32") -> list[Case]:
    """The Hugging Face models: the three users, no defence and clipping, server buffers not sent (train mode)."""
    return [Case(model, user, False, defence, precision=precision)
            for model in HF_TEXT_MODELS for user in USERS for defence in ("none", "clip")]


def _text_zoo(precision="float32") -> list[Case]:
    return [Case(model, user, buffers, defence, precision=precision)
            for model in TEXT_ZOO_MODELS for user in USERS for defence in ("none", "clip")
            for buffers in ((False, True) if model in FIXED_POSITION_MODELS else (False,))]


# breaching's other vision families, one model each, with the image shape of its cases (full grid
# only). DenseNet121 and nfnet run on 16x16 images, which their architectures take (DenseNet's
# CIFAR stem keeps the size and its three transitions leave 2x2 positions; NFNet's unpadded stem
# leaves 8x8 and its strided stages 4, 2, 1); convnet_beyond on 28x28 single-channel images, as its
# Linear(12544, 12544) requires. nfnet is in eval mode only ("buffers sent": its buffers are the
# weight standardisation's eps and fan_in): in train mode torch draws its stochastic-depth and
# dropout masks from its own generator, which no JAX user can reproduce. convnet_beyond has no
# float64 cases: 158M parameters, 1.3 GB per copy in float64, more than this machine can hold for
# both frameworks' users (see docs/parity.md), and its clipped aggregate is left out in float32 too
# (per-example gradients of two users' 158M parameters in both frameworks passed 12.6 GB here).
ZOO_VISION_SHAPES = {"VGG11": (3, 32, 32), "DenseNet121": (3, 16, 16), "nfnet": (3, 16, 16),
                     "convnet-trivial": (3, 32, 32), "convnet_beyond": (1, 28, 28)}
ZOO_WITHOUT_BUFFERS = ("convnet-trivial", "convnet_beyond")


def _vision_zoo(precision: str = "float32") -> list[Case]:
    cases = []
    for model, shape in ZOO_VISION_SHAPES.items():
        if precision == "float64" and model == "convnet_beyond":
            continue
        for user, buffers, defence in itertools.product(USERS, (False, True), ("none", "clip")):
            if (model == "nfnet" and not buffers) or (model in ZOO_WITHOUT_BUFFERS and buffers and defence != "none"):
                continue
            if model == "convnet_beyond" and user == "aggregate" and defence == "clip":
                continue
            cases.append(Case(model, user, buffers, defence, precision=precision, image_shape=shape))
    return cases


# The ResNets of breaching's case files and one of each other family (basic and bottleneck
# blocks, GroupNorm, torchvision's ImageNet stem): (model, data name, image shape). The images are
# the smallest that leave 2x2 positions at the last stage (2x2 x one example is what a per-example
# clipping user's BatchNorm normalises over): 64x64 for torchvision's stride-32 nets, 16x16 for
# breaching's four-stage and 8x8 for its three-stage nets, which keeps float64 affordable here.
RESNET_ZOO = (("resnet18", "ImageNet", (3, 64, 64)), ("resnet50", "ImageNet", (3, 64, 64)),
              ("ResNet32-10", "CIFAR10", (3, 8, 8)), ("ResNet50", "CIFAR10", (3, 16, 16)),
              ("ResNetGN18", "CIFAR10", (3, 16, 16)))


def _resnet_zoo(precision: str = "float32") -> list[Case]:
    """The three users, buffers sent or not, no defence and clipping, each case on every model in turn.

    Without BatchNorm (ResNetGN18) "buffers sent" only flips the (empty) eval mode: one case per user.
    """
    return [Case(model, user, buffers, defence, precision=precision, image_shape=shape, data_name=data)
            for user, buffers, defence in itertools.product(USERS, (False, True), ("none", "clip"))
            for model, data, shape in RESNET_ZOO if not ("GN" in model and buffers and defence != "none")]


def all_cases(quick: bool = False, precision: Optional[str] = None) -> list[Case]:
    """The full grid, or the CI subset with ``quick``; ``precision`` picks one precision only."""
    if quick:
        # resnet20 carries the BatchNorm paths at a fraction of ConvNet's cost on a CI CPU.
        f32 = _grid(("lenet_zhu", "resnet20"), defences=("none", "clip", "gradient_noise")) + [
            c for c in _special(("resnet20",)) if c.tag in ("ragged", "second-query")
        ] + [Case("transformer3", "local_update", False, "none")] + _chunked() + [
            Case("resnet18", "local_gradient", True, "none", image_shape=(3, 64, 64), data_name="ImageNet")]
        f64 = [Case(m, u, b, d, precision="float64") for m in ("resnet20",) for u in USERS
               for b in (False, True) for d in ("none", "clip")]
    else:
        f32 = _grid(VISION_MODELS) + _special(("resnet20",)) + _text() + _text_zoo() + _chunked((False, True))
        # Every vision model but ConvNetSmall (15M parameters: one float64 aggregate takes minutes here).
        f64_models = ("linear", "MLP", "lenet_zhu", "ConvNet", "cnn6", "resnet18", "resnet20")
        f64 = _grid(f64_models, precision="float64", defences=("none", "clip")) + [
            Case(m, "local_update", False, precision="float64", num_examples=5, tag="ragged",
                 user_overrides=(("num_local_updates", 4), ("num_data_per_local_update_step", 2)))
            for m in ("ConvNet", "resnet20")] + [Case("ConvNetSmall", "aggregate", False, precision="float64")] + [
            Case(m, u, False, d, precision="float64") for m in TEXT_MODELS for u in USERS for d in ("none", "clip")
        ] + _text_zoo("float64") + _chunked(precision="float64")
        f32, f64 = f32 + _vision_zoo(), f64 + _vision_zoo("float64")
        f32, f64 = f32 + _resnet_zoo(), f64 + _resnet_zoo("float64")
        f32, f64 = f32 + _hf_text(), f64 + _hf_text("float64")
    if precision == "float32":
        return f32
    if precision == "float64":
        return f64
    return f32 + f64


def cases_by_name() -> dict[str, Case]:
    """Every case of the full and the quick grid, both precisions, by name (names are unique)."""
    return {case.name: case for quick in (False, True) for case in all_cases(quick=quick)}
