"""Images -> a prepared data directory, and training batches from it (`lmlab prepare` of images).

Sources: a folder with one sub-folder of images per class (read with Pillow), scikit-learn's bundled
8x8 digits (`sklearn-digits`), or the seeded captioned shapes of lmlab/data/shapes.py
(`shapes-captions`). Every image is resized once, at prepare time, and stored as uint8 pixels
([N, H, W, C] .npy files, memory-mapped when read); rescaling and normalising happen per batch.
The preprocessing is saved as `preprocessor_config.json` in Hugging Face's ViTImageProcessor format
(resize with bilinear resampling, rescale by 1/255, normalise by mean and std), and `Preprocess`
repeats it exactly, so an image of any size reaches the model as the processor would give it.

Classification splits are stratified (each class split in the same proportions, seeded); captioned
shapes keep held-out colour-shape pairs out of train and val and put them in half of the test split.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmlab.config import to_dict
from lmlab.errors import LmlabError
from lmlab.utils.atomic import atomic_dir, atomic_write_text

log = logging.getLogger(__name__)

FORMAT = "lmlab-images-v1"
SPLITS = ("train", "val", "test")
IMAGE_SOURCES = ("sklearn-digits", "shapes-captions")
EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
UNNAMED_ID = -2  # caption tokens: a word the picture does not name (lmlab/data/shapes.py's unnamed colours)
BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, transformers' ViTImageProcessor default


@dataclass(kw_only=True)
class ImagePrepareConfig:
    source: str = "sklearn-digits"    # a folder of class sub-folders, sklearn-digits or shapes-captions
    out: str = ""                     # data directory to create (default: data/<source name>)
    image_size: int = 0               # side images are resized to (0: 8 for digits, 32 for shapes, else 224)
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 1337
    n_train: int = 20000              # shapes-captions: training pictures
    n_eval: int = 0                   # shapes-captions: val and test pictures each (0: a tenth of n_train)
    unnamed: float = 0.0              # shapes-captions: share of training shapes in an unnamed colour
    image_mean: list[float] = field(default_factory=lambda: [0.5])  # per channel (one value: every channel)
    image_std: list[float] = field(default_factory=lambda: [0.5])   # ViTImageProcessor's defaults


# ---------------------------------------------------------------------------------------------
# preprocessing (transformers' ViTImageProcessor)

@dataclass
class Preprocess:
    height: int
    width: int
    n_channels: int
    image_mean: list[float]
    image_std: list[float]
    rescale_factor: float = 1 / 255
    resample: int = BILINEAR

    @property
    def mode(self) -> str:
        return "L" if self.n_channels == 1 else "RGB"

    def to_hf(self) -> dict:
        return {"image_processor_type": "ViTImageProcessor", "do_resize": True, "resample": self.resample,
                "size": {"height": self.height, "width": self.width}, "do_rescale": True,
                "rescale_factor": self.rescale_factor, "do_normalize": True, "image_mean": self.image_mean,
                "image_std": self.image_std, "do_convert_rgb": self.n_channels == 3, "lmlab_channels": self.n_channels}

    @classmethod
    def from_hf(cls, d: dict) -> Preprocess:
        if d.get("do_resize") is False or d.get("do_rescale") is False or d.get("do_normalize") is False:
            raise LmlabError("preprocessor_config.json: lmlab always resizes, rescales and normalises")
        mean, std = d.get("image_mean", [0.5] * 3), d.get("image_std", [0.5] * 3)
        mean, std = ([x] if isinstance(x, (int, float)) else list(x) for x in (mean, std))
        channels = int(d.get("lmlab_channels", 3))
        size = d.get("size", {"height": 224, "width": 224})
        return cls(int(size["height"]), int(size["width"]), channels, [float(x) for x in mean],
                   [float(x) for x in std], float(d.get("rescale_factor", 1 / 255)),
                   int(d.get("resample", BILINEAR)))

    @classmethod
    def load(cls, directory: str | Path) -> Preprocess:
        file = Path(directory) / "preprocessor_config.json"
        if not file.is_file():
            raise LmlabError(f"{directory} has no preprocessor_config.json (images are prepared by `lmlab prepare`)")
        return cls.from_hf(json.loads(file.read_text(encoding="utf-8")))

    def resize(self, image) -> np.ndarray:
        """A PIL image -> uint8 [H, W, C] at the target size (Pillow's bilinear filter, as transformers)."""
        image = image.convert(self.mode)
        if image.size != (self.width, self.height):
            image = image.resize((self.width, self.height), resample=self.resample)
        return np.asarray(image, dtype=np.uint8).reshape(self.height, self.width, self.n_channels)

    def normalize(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [..., H, W, C] -> float32 [..., C, H, W]: x / 255, then (x - mean) / std per channel."""
        x = torch.from_numpy(np.array(pixels, dtype=np.float32)) * self.rescale_factor
        mean = torch.tensor(self.image_mean, dtype=torch.float32)
        std = torch.tensor(self.image_std, dtype=torch.float32)
        return ((x - mean) / std).movedim(-1, -3).contiguous()

    def __call__(self, path: str | Path) -> torch.Tensor:
        """An image file -> float32 [C, H, W], as the model reads it."""
        return self.normalize(self.resize(read_image(path)))


def read_image(path: str | Path):
    """A fully decoded PIL image; a file that is not an image, or is truncated, is an LmlabError naming it."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()  # decodes now: a truncated file fails here, not later in a batch
            return im.copy()
    except UnidentifiedImageError:
        raise LmlabError(f"{path} is not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise LmlabError(f"{path} is a damaged image ({e})") from None


# ---------------------------------------------------------------------------------------------
# sources

def is_image_folder(source: str) -> bool:
    """A folder whose entries are all sub-folders (one per class) holding at least one image file."""
    p = Path(source)
    if not p.is_dir():
        return False
    entries = [e for e in p.iterdir() if not e.name.startswith(".")]
    return bool(entries) and all(e.is_dir() for e in entries) and any(
        f.suffix.lower() in EXTENSIONS for e in entries for f in e.iterdir())


def read_image_folder(folder: Path, pre: Preprocess) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """(uint8 images, labels, class names, file names) of a folder of class sub-folders."""
    classes = sorted(e.name for e in folder.iterdir() if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise LmlabError(f"{folder} has no class sub-folders (expected {folder}/<class>/<image files>)")
    images, labels, files = [], [], []
    for k, name in enumerate(classes):
        paths = sorted(f for f in (folder / name).iterdir() if f.is_file() and not f.name.startswith("."))
        if not paths:
            raise LmlabError(f"class folder {folder / name} is empty: every class needs at least one image")
        for f in paths:
            images.append(pre.resize(read_image(f)))
            labels.append(k)
            files.append(str(f.relative_to(folder)))
    return np.stack(images), np.asarray(labels, dtype=np.int64), classes, files


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """0/1/2 (train/val/test) per example: each class shuffled (seeded) and cut in the same proportions."""
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise LmlabError("val_fraction and test_fraction must be >= 0 and sum to less than 1")
    rng = np.random.default_rng(seed)
    split = np.zeros(len(labels), dtype=np.int64)
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        n_test, n_val = int(round(test_fraction * len(idx))), int(round(val_fraction * len(idx)))
        split[idx[:n_test]] = 2
        split[idx[n_test:n_test + n_val]] = 1
    return split


# ---------------------------------------------------------------------------------------------
# prepare

def _preprocess(cfg: ImagePrepareConfig, n_channels: int, default_size: int) -> Preprocess:
    size = cfg.image_size or default_size
    mean, std = list(cfg.image_mean), list(cfg.image_std)
    if len(mean) == 1:
        mean = mean * n_channels
    if len(std) == 1:
        std = std * n_channels
    if len(mean) != n_channels or len(std) != n_channels:
        raise LmlabError(f"image_mean and image_std need 1 or {n_channels} values")
    return Preprocess(size, size, n_channels, mean, std)


def prepare_images(cfg: ImagePrepareConfig, *, force: bool = False) -> Path:
    t0 = time.time()
    out = Path(cfg.out or Path("data") / Path(cfg.source.rstrip("/")).name)
    if out.exists() and not force:
        raise LmlabError(f"{out} already exists (use --force to rebuild it)")
    model: dict = {}
    if cfg.source == "shapes-captions":
        return _prepare_captions(cfg, out, force, t0)
    if cfg.source == "sklearn-digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        pre = _preprocess(cfg, 1, 8)
        # 8x8 pixels of 0..16 (UCI optdigits) -> 0..255, resized if another size is asked for
        raw = np.rint(d.images * (255 / 16)).astype(np.uint8)
        from PIL import Image

        images = np.stack([pre.resize(Image.fromarray(im, mode="L")) for im in raw])
        labels, classes = d.target.astype(np.int64), [str(c) for c in d.target_names]
        corpus = {"source": "sklearn.datasets.load_digits", "n_images": len(labels)}
    else:
        folder = Path(cfg.source)
        if not folder.is_dir():
            raise LmlabError(f"image source {folder} is not a folder (nor one of {', '.join(IMAGE_SOURCES)})")
        pre = _preprocess(cfg, 3, 224)
        images, labels, classes, files = read_image_folder(folder, pre)
        corpus = {"source": str(folder), "n_images": len(labels)}
    split = stratified_split(labels, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    model = {"n_classes": len(classes), "labels": classes, "image_size": pre.height, "n_channels": pre.n_channels}
    with atomic_dir(out, replace=force) as tmp:
        splits = {}
        for i, s in enumerate(SPLITS):
            sel = split == i
            np.save(tmp / f"{s}.images.npy", images[sel])
            np.save(tmp / f"{s}.labels.npy", labels[sel])
            splits[s] = {"n": int(sel.sum()), "images": f"{s}.images.npy", "labels": f"{s}.labels.npy",
                         "per_class": np.bincount(labels[sel], minlength=len(classes)).tolist()}
        _write_meta(tmp, out, "classify", pre, model, splits, corpus, cfg, t0)
    return out


def _prepare_captions(cfg: ImagePrepareConfig, out: Path, force: bool, t0: float) -> Path:
    from lmlab.data.shapes import UNNAMED, ShapesConfig, generate
    from lmlab.tokenizers import train_tokenizer

    if cfg.n_train < 1 or cfg.n_eval < 0 or cfg.n_eval == 1:  # val and test need a seen half and an unseen half
        raise LmlabError(f"shapes-captions needs n_train >= 1 and n_eval 0 (a tenth of n_train) or >= 2 "
                         f"(got {cfg.n_train}, {cfg.n_eval})")
    shapes = ShapesConfig(image_size=cfg.image_size or 32)
    pre = _preprocess(cfg, 3, shapes.image_size)
    n_small = cfg.n_eval or max(cfg.n_train // 10, 2)
    # seeds per split (and per half of val and test) so no two splits share a picture by construction;
    # the second half of val has the validation's held-out pairs, the second half of test the test's
    parts = {"train": [generate(cfg.n_train, cfg.seed, unnamed=cfg.unnamed, cfg=shapes)],
             "val": [generate(n_small - n_small // 2, cfg.seed + 1, cfg=shapes),
                     generate(n_small // 2, cfg.seed + 4, unseen=shapes.val_held_out, cfg=shapes)],
             "test": [generate(n_small - n_small // 2, cfg.seed + 2, cfg=shapes),
                      generate(n_small // 2, cfg.seed + 3, unseen=shapes.held_out, cfg=shapes)]}
    tok = train_tokenizer("word", [t.replace(UNNAMED, "") for t in parts["train"][0][1]], vocab_size=0,
                          min_count=1)
    with atomic_dir(out, replace=force) as tmp:
        tok.save(str(tmp))
        splits, longest = {}, 0
        for s, chunks in parts.items():
            images = np.concatenate([c[0] for c in chunks])
            captions = [t for c in chunks for t in c[1]]
            slots = [x for c in chunks for x in c[2]]
            # an unnamed colour: UNNAMED_ID (the decoder reads <mask>, no loss there)
            ids = [[tok.eos_id, *(UNNAMED_ID if w == UNNAMED else tok.encode(w)[0] for w in t.split()), tok.eos_id]
                   for t in captions]
            if any(i == tok.unk_id for row in ids for i in row):
                raise LmlabError(f"split {s}: a caption word is missing from the training captions' vocabulary")
            longest = max(longest, max(len(r) for r in ids))
            tokens = np.full((len(ids), max(len(r) for r in ids)), -1, dtype=np.int32)
            for r, row in enumerate(ids):
                tokens[r, :len(row)] = row
            np.save(tmp / f"{s}.images.npy", images)
            np.save(tmp / f"{s}.tokens.npy", tokens)
            atomic_write_text(tmp / f"{s}.captions.jsonl",
                              "".join(json.dumps({"caption": t, **x}) + "\n" for t, x in zip(captions, slots)))
            novel = [len(c[1]) for c in chunks]
            splits[s] = {"n": len(captions), "images": f"{s}.images.npy", "tokens": f"{s}.tokens.npy",
                         "captions": f"{s}.captions.jsonl",
                         "n_novel": novel[1] if len(novel) > 1 else 0}
        corpus = {"source": "lmlab.data.shapes", "held_out": [list(p) for p in shapes.held_out],
                  "val_held_out": [list(p) for p in shapes.val_held_out], "unnamed": cfg.unnamed,
                  "note": "val and test: the first n - n_novel pictures use training pairs; the last n_novel "
                          "a pair held out of training (val_held_out and held_out)"}
        model = {"image_size": pre.height, "n_channels": 3}
        _write_meta(tmp, out, "caption", pre, model, splits, corpus, cfg, t0, vocab_size=tok.vocab_size,
                    longest=longest - 1)
    return out


def _write_meta(tmp: Path, out: Path, task: str, pre: Preprocess, model: dict, splits: dict, corpus: dict,
                cfg: ImagePrepareConfig, t0: float, vocab_size: int = 0, longest: int = 0) -> None:
    if splits["train"]["n"] == 0:
        raise LmlabError(f"'{cfg.source}' gave no training images")
    atomic_write_text(tmp / "preprocessor_config.json", json.dumps(pre.to_hf(), indent=2))
    meta = {"format": FORMAT, "task": task, "vocab_size": vocab_size, "model": model, "splits": splits,
            "max_tokens": longest, "corpus": corpus, "prepare": to_dict(cfg) | {"out": str(out)},
            "seconds": round(time.time() - t0, 2)}
    atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2))
    log.info(f"wrote {out}: " + ", ".join(f"{s} {splits[s]['n']:,} images" for s in SPLITS))


# ---------------------------------------------------------------------------------------------
# reading and batches

class ImageSplit:
    """One split of a prepared image directory: uint8 images (memory-mapped) and labels or caption tokens."""

    is_images = True

    def __init__(self, data_dir: str | Path, split: str):
        self.dir = Path(data_dir)
        meta_file = self.dir / "meta.json"
        self.meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if self.meta.get("format") != FORMAT:
            raise LmlabError(f"{meta_file}: not a prepared image directory")
        if split not in self.meta["splits"]:
            raise LmlabError(f"{data_dir} has no split '{split}' (has {', '.join(self.meta['splits'])})")
        self.split, self.task = split, self.meta["task"]
        info = self.meta["splits"][split]
        self.images = np.load(self.dir / info["images"], mmap_mode="r")
        self.labels = np.load(self.dir / info["labels"]) if "labels" in info else None
        self.tokens = np.load(self.dir / info["tokens"]) if "tokens" in info else None
        self.preprocess = Preprocess.load(self.dir)

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx: np.ndarray, pixels: np.ndarray | None = None, eos_id: int = 0,
              mask_id: int = 0) -> dict[str, torch.Tensor]:
        """The model's keyword arguments for examples `idx` (`pixels`: their images, e.g. augmented); an
        unnamed word (UNNAMED_ID) is read as `mask_id` and never a target."""
        px = self.preprocess.normalize(self.images[idx] if pixels is None else pixels)
        if self.task == "classify":
            return {"pixel_values": px, "labels": torch.from_numpy(self.labels[idx].astype(np.int64))}
        rows = torch.from_numpy(self.tokens[idx].astype(np.int64))
        x, y = rows[:, :-1].clone(), rows[:, 1:].clone()
        x[x == UNNAMED_ID] = mask_id
        x[x < 0] = eos_id  # padding after the closing </s>: never a target
        y[y < 0] = -100
        return {"pixel_values": px, "input_ids": x, "targets": y}


def open_split(data_dir: str | Path, split: str):
    """A split of any prepared data directory: token shards (TokenSplit), images (ImageSplit) or
    labelled texts (lmlab/data/classify.py's TextClassSplit)."""
    from lmlab.data.classify import TextClassSplit, is_labelled_text
    from lmlab.data.stream import TokenSplit

    if is_labelled_text(data_dir):
        return TextClassSplit(data_dir, split)
    meta = Path(data_dir) / "meta.json"
    if meta.is_file() and json.loads(meta.read_text(encoding="utf-8")).get("format") == FORMAT:
        return ImageSplit(data_dir, split)
    return TokenSplit(data_dir, split)


def shift(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Each image moved by up to `max_shift` pixels in x and y, the vacated border zero (augmentation)."""
    out = np.zeros_like(images)
    H, W = images.shape[1:3]
    for i, (dy, dx) in enumerate(rng.integers(-max_shift, max_shift + 1, size=(len(images), 2))):
        out[i, max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
            images[i, max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
    return out


class ImageBatches:
    """Batches of a split in a new seeded order every epoch; batch i depends on (seed, i) alone, so a
    resumed run sees the same batches. `augment` > 0: random shifts of up to that many pixels."""

    def __init__(self, data: ImageSplit, batch_size: int, seed: int = 0, augment: int = 0, eos_id: int = 0,
                 mask_id: int = 0):
        if len(data) == 0:
            raise LmlabError(f"split '{data.split}' of {data.dir} holds no images")
        self.data, self.batch_size, self.seed, self.augment, self.eos_id = data, batch_size, seed, augment, eos_id
        self.mask_id = mask_id
        self.step = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.data)))
        return self._perm[1]

    def next_batch(self) -> dict[str, torch.Tensor]:
        n = len(self.data)
        g = self.step * self.batch_size + np.arange(self.batch_size)
        idx = np.array([self._order(int(e))[j] for e, j in zip(g // n, g % n)])
        pixels = None
        if self.augment > 0:
            pixels = shift(self.data.images[idx], self.augment, np.random.default_rng([self.seed, self.step, 1]))
        self.step += 1
        return self.data.batch(idx, pixels, self.eos_id, self.mask_id)

    def state_dict(self) -> dict:
        return {"kind": "images", "seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])
