"""ViT and the image captioner: HF parity both ways, ViTImageProcessor parity, position-embedding
interpolation, bad images, captions through the one decode loop, and the CLI on a tiny folder."""

import json

import numpy as np
import pytest
import torch
from peers import require_module

from lmlab.cli import main
from lmlab.data.images import (
    ImageBatches,
    ImagePrepareConfig,
    ImageSplit,
    Preprocess,
    prepare_images,
    read_image_folder,
)
from lmlab.data.shapes import COLOURS, HELD_OUT, UNNAMED, VAL_HELD_OUT, generate, parse_caption
from lmlab.errors import LmlabError
from lmlab.generate.engine import Decoder, SamplingConfig, generate_ids
from lmlab.io.hf import load_hf_dir, save_hf_dir
from lmlab.models.transformer.captioner import Captioner, CaptionerConfig
from lmlab.models.transformer.vit import ViT, ViTConfig
from lmlab.nn.patch import interpolate_pos_embed

PIL = require_module("PIL")
from PIL import Image  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _hf():
    transformers = require_module("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def _tiny_vit(**kw) -> ViT:
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=12, patch_size=4, n_channels=3, n_classes=5, n_layer=2, n_head=4, n_embd=32,
                    mlp_hidden=64, init_std=0.2, labels=list("abcde"), **kw)
    return ViT(cfg).eval()


def test_vit_from_hf_matches_logits_and_interpolation(tmp_path):
    transformers = _hf()
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=12, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64, num_labels=5, initializer_range=0.2)
    hf = transformers.ViTForImageClassification(cfg).eval()
    hf.save_pretrained(tmp_path)  # the file layout every Hub ViT has
    ours, _ = load_hf_dir(tmp_path)
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(pixel_values=x).logits, **TOL)
        # another size: bicubically interpolated position embeddings, as transformers interpolates them
        y = torch.randn(2, 3, 20, 16)
        torch.testing.assert_close(ours(y).logits, hf(pixel_values=y, interpolate_pos_encoding=True).logits, **TOL)
        # in-memory (transformers 5) names read too
        from lmlab.io.hf import from_hf

        torch.testing.assert_close(from_hf(cfg.to_dict(), hf.state_dict())(x).logits, hf(pixel_values=x).logits, **TOL)


def test_vit_to_hf_matches_logits(tmp_path):
    transformers = _hf()
    ours = _tiny_vit()
    save_hf_dir(ours, tmp_path / "hf")
    hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.id2label == {i: c for i, c in enumerate("abcde")}
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, ours(x).logits, **TOL)
    with pytest.raises(LmlabError, match="pool='cls'"):
        save_hf_dir(_tiny_vit(pool="mean"), tmp_path / "mean")


def test_position_embeddings_interpolate():
    pos = torch.randn(1, 1 + 16, 8)
    assert interpolate_pos_embed(pos, (4, 4), 1) is pos  # the learned grid: unchanged
    big = interpolate_pos_embed(pos, (6, 8), 1)
    assert big.shape == (1, 1 + 48, 8) and torch.equal(big[:, 0], pos[:, 0])  # the class token's row kept
    # a linear ramp across the grid stays a ramp inside the grid (bicubic reproduces linear functions)
    ramp = torch.arange(4.0).repeat(4).view(1, 16, 1).expand(1, 16, 2).contiguous()
    out = interpolate_pos_embed(torch.cat([torch.zeros(1, 1, 2), ramp], 1), (4, 7), 1)[0, 1:, 0].view(4, 7)
    assert torch.all(out[:, 2:5].diff(dim=1) > 0) and torch.allclose(out[0], out[3])
    vit = _tiny_vit(pool="mean")
    assert vit(torch.randn(1, 3, 16, 24)).logits.shape == (1, 5)
    with pytest.raises(ValueError, match="whole number"):
        vit(torch.randn(1, 3, 13, 12))


def test_preprocess_equals_vit_image_processor(tmp_path):
    transformers = _hf()
    rng = np.random.default_rng(0)
    path = tmp_path / "odd.png"
    Image.fromarray(rng.integers(0, 256, size=(37, 23, 3), dtype=np.uint8)).save(path)
    pre = Preprocess(16, 16, 3, [0.48, 0.46, 0.41], [0.27, 0.26, 0.28])
    proc_cls = getattr(transformers, "ViTImageProcessorPil", transformers.ViTImageProcessor)
    proc = proc_cls(**{k: v for k, v in pre.to_hf().items() if k not in ("image_processor_type", "lmlab_channels")})
    want = proc(Image.open(path), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(pre(path), want, rtol=0, atol=1e-6)
    # the saved config reads back to the same preprocessing
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre.to_hf()))
    assert Preprocess.load(tmp_path) == pre


def _folder(root, sizes=((9, 7), (12, 12), (5, 11)), n=4):
    rng = np.random.default_rng(1)
    for k, name in enumerate(("cat", "dog", "owl")):
        (root / name).mkdir(parents=True)
        for i in range(n):
            h, w = sizes[i % len(sizes)]
            px = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
            px[..., k] += 180  # class k: a noisy red, green or blue
            Image.fromarray(px).save(root / name / f"{i}.png")
    return root


def test_bad_images_name_the_file(tmp_path):
    pre = Preprocess(8, 8, 3, [0.5] * 3, [0.5] * 3)
    root = _folder(tmp_path / "a")
    data = (root / "dog" / "0.png").read_bytes()
    (root / "dog" / "0.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(LmlabError, match=r"dog/0\.png is a damaged image"):
        read_image_folder(root, pre)
    root = _folder(tmp_path / "b")
    (root / "owl" / "notes.png").write_text("not a picture")
    with pytest.raises(LmlabError, match=r"owl/notes\.png is not an image"):
        read_image_folder(root, pre)
    root = _folder(tmp_path / "c")
    (root / "empty").mkdir()
    with pytest.raises(LmlabError, match=r"class folder .*empty is empty"):
        read_image_folder(root, pre)


def test_digits_split_is_stratified_and_seeded(tmp_path):
    require_module("sklearn")
    out = prepare_images(ImagePrepareConfig(source="sklearn-digits", out=str(tmp_path / "d")))
    meta = json.loads((out / "meta.json").read_text())
    counts = {s: np.array(meta["splits"][s]["per_class"]) for s in ("train", "val", "test")}
    total = sum(counts.values())
    assert total.sum() == 1797 and np.all(np.abs(counts["test"] / total - 0.2) < 0.01)
    again = prepare_images(ImagePrepareConfig(source="sklearn-digits", out=str(tmp_path / "e")))
    assert np.array_equal(np.load(out / "test.images.npy"), np.load(again / "test.images.npy"))
    split = ImageSplit(out, "train")
    b = ImageBatches(split, 8, seed=3, augment=1)
    first = [b.next_batch()["labels"] for _ in range(3)]
    b2 = ImageBatches(split, 8, seed=3, augment=1)
    b2.load_state_dict({"seed": 3, "step": 2})  # resuming reproduces the batch
    assert torch.equal(b2.next_batch()["labels"], first[2])


def test_shapes_generator():
    images, captions, slots = generate(200, 5)
    again = generate(200, 5)
    assert np.array_equal(images, again[0]) and captions == again[1]
    assert all(parse_caption(c) == s for c, s in zip(captions, slots))
    pairs = {(s["colour"], s["shape"]) for s in slots} | {(s["colour2"], s["shape2"]) for s in slots}
    assert not pairs & (set(HELD_OUT) | set(VAL_HELD_OUT)) and len({s["relation"] for s in slots}) == 4
    assert not set(HELD_OUT) & set(VAL_HELD_OUT)
    for held in (HELD_OUT, VAL_HELD_OUT):
        _, _, novel = generate(50, 6, unseen=held)
        assert all({(s["colour"], s["shape"]), (s["colour2"], s["shape2"])} & set(held) for s in novel)


def test_unnamed_colours_keep_away_from_held_out_pairs():
    import colorsys

    images, captions, slots = generate(300, 7, unnamed=0.5)
    named = generate(300, 7)
    assert named[1] != captions and all(parse_caption(c) == s for c, s in zip(captions, slots))
    n_unnamed = sum(s[k] == UNNAMED for s in slots for k in ("colour", "colour2"))
    assert 200 < n_unnamed < 400  # about half of the 600 shapes
    held = {shape: [c for c, s in (*HELD_OUT, *VAL_HELD_OUT) if s == shape] for _, shape in HELD_OUT}
    hue = {c: 360 * colorsys.rgb_to_hsv(*(v / 255 for v in rgb))[0] for c, rgb in COLOURS.items()}
    for img, s in zip(images, slots):  # the subject's colour: the most common bright pixel
        if s["colour"] != UNNAMED:
            continue
        px = img.reshape(-1, 3).astype(int)
        px = px[px.max(1) > 40]
        rgb = np.unique(px, axis=0, return_counts=True)
        r, g, b = rgb[0][rgb[1].argmax()] / 255
        h, sat, _ = colorsys.rgb_to_hsv(r, g, b)
        if sat > 0.3:  # not a grey: its hue is far from every colour held out with this shape
            assert all(min(abs(360 * h - hue[c]), 360 - abs(360 * h - hue[c])) > 30 for c in held[s["shape"]])


def test_unnamed_colour_is_read_as_mask_and_never_a_target(tmp_path):
    from lmlab.data.images import UNNAMED_ID
    from lmlab.data.objectives import make_sampler
    from lmlab.tokenizers import load_tokenizer

    data = prepare_images(ImagePrepareConfig(source="shapes-captions", out=str(tmp_path / "d"), n_train=60,
                                             image_size=16, unnamed=0.5))
    tok = load_tokenizer(data)
    assert tok.encode(UNNAMED) == [tok.unk_id, tok.eos_id]  # not a word of the vocabulary
    split = ImageSplit(data, "train")
    assert split.meta["splits"]["val"]["n_novel"] == split.meta["splits"]["test"]["n_novel"] == 3
    model = Captioner(CaptionerConfig(image_size=16, patch_size=8, n_enc_layer=1, n_layer=1, n_head=2, n_embd=16,
                                      mlp_hidden=32, vocab_size=tok.vocab_size, block_size=16))
    sampler = make_sampler("random", split, model, 16, 60, 0)  # one batch: the whole split, shuffled
    b = sampler.next_batch()
    order = np.random.default_rng([0, 0]).permutation(60)
    raw = torch.from_numpy(split.tokens[order]).long()
    unnamed = raw == UNNAMED_ID
    assert 20 < int(unnamed.sum()) < 100  # about half of the 120 shapes
    assert torch.equal(b["input_ids"] == tok.mask_id, unnamed[:, :-1])
    assert torch.equal(b["targets"] == -100, unnamed[:, 1:] | (raw[:, 1:] < 0))
    with torch.no_grad():
        assert float(model(**b).loss) > 0


def test_eval_splits_do_not_depend_on_the_training_size(tmp_path):
    def prep(name, n_train):
        return prepare_images(ImagePrepareConfig(source="shapes-captions", out=str(tmp_path / name), n_train=n_train,
                                                 n_eval=12, image_size=16))

    small, big = prep("small", 30), prep("big", 90)
    assert len(ImageSplit(small, "train")) == 30 and len(ImageSplit(big, "train")) == 90
    for split in ("val", "test"):
        a, b = ImageSplit(small, split), ImageSplit(big, split)
        assert len(a) == 12 and np.array_equal(a.images[:], b.images[:])
    for bad in (-1, 1):
        with pytest.raises(LmlabError, match=r"n_eval 0 \(a tenth of n_train\) or >= 2"):
            prepare_images(ImagePrepareConfig(source="shapes-captions", out=str(tmp_path / "bad"), n_eval=bad))


def test_captioner_decodes_through_the_engine():
    torch.manual_seed(0)
    cfg = CaptionerConfig(image_size=8, patch_size=4, n_enc_layer=1, n_layer=2, n_head=2, n_embd=32, mlp_hidden=64,
                          vocab_size=20, block_size=12, init_std=0.3)
    model = Captioner(cfg).eval()
    px = torch.randn(3, 3, 8, 8)
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    rows = [[] for _ in range(3)]
    dec = Decoder(model, [[1]] * 3, greedy, inputs={"pixel_values": px})  # the three images in one batch
    while not dec.done:
        for i, t in dec.step():
            rows[i].append(t)
    for i in range(3):
        # reference: the whole sequence recomputed without a cache at every step
        ids = [1]
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]), pixel_values=px[i:i + 1]).logits[0, -1].argmax()))
        cached = list(generate_ids(model, [1], greedy, inputs={"pixel_values": px[i:i + 1]}))
        uncached = list(generate_ids(model, [1], greedy, use_cache=False, inputs={"pixel_values": px[i:i + 1]}))
        assert cached == uncached == rows[i] == ids[1:]
    with pytest.raises(ValueError, match="pixel_values"):
        model(torch.tensor([[1]]))


def test_captioner_reads_blind_ids_as_blind_to():
    """Blind token ids are read as `blind_to` on every path (training, prefill and cached decoding), so
    the word after one depends on the picture alone; the targets are untouched."""
    torch.manual_seed(0)
    kw = dict(image_size=8, patch_size=4, n_enc_layer=1, n_layer=2, n_head=2, n_embd=32, mlp_hidden=64,
              vocab_size=20, block_size=12, init_std=0.3)
    plain = Captioner(CaptionerConfig(**kw)).eval()
    blind = Captioner(CaptionerConfig(**kw, blind_ids=(7, 9), blind_to=4)).eval()
    blind.load_state_dict(plain.state_dict())
    px = torch.randn(2, 3, 8, 8)
    ids = torch.tensor([[1, 7, 3, 9, 2], [1, 5, 9, 7, 2]])
    seen = torch.tensor([[1, 4, 3, 4, 2], [1, 5, 4, 4, 2]])
    out = blind(ids, targets=ids, pixel_values=px)
    ref = plain(seen, targets=ids, pixel_values=px)
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    assert not torch.allclose(out.logits, plain(ids, pixel_values=px).logits)
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    for i in range(2):
        cached = list(generate_ids(blind, [1, 7], greedy, inputs={"pixel_values": px[i:i + 1]}))
        uncached = list(generate_ids(blind, [1, 7], greedy, use_cache=False, inputs={"pixel_values": px[i:i + 1]}))
        ref = list(generate_ids(plain, [1, 4], greedy, inputs={"pixel_values": px[i:i + 1]}))
        assert not {7, 9} & set(ref[:-1])  # else the plain model would read a token the blind one masks
        assert cached == uncached == ref
    with pytest.raises(ValueError, match="blind_ids"):
        Captioner(CaptionerConfig(**kw, blind_ids=(20,)))


def test_cli_prepare_train_eval_on_a_folder(tmp_path, capsys):
    root = _folder(tmp_path / "pics", n=6)
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["prepare", str(root), "--out", str(data), "--image_size", "8", "--test_fraction", "0.34",
                 "--val_fraction", "0.17"]) == 0
    assert main(["prepare", str(root), "--out", str(data), "--tokenizer", "char"]) == 2  # a text option
    assert main(["info", str(data)]) == 0 and "3 classes: cat, dog, owl" in capsys.readouterr().out
    assert main(["train", "--data", str(data), "--model", "vit-tiny", "--out", str(run), "--model.patch_size=4",
                 "--train.max_steps=40", "--train.batch_size=8", "--train.lr=3e-3", "--train.warmup_steps=2",
                 "--train.eval_interval=0", "--train.eval_iters=1", "--train.progress=false"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--plot", str(tmp_path / "cm.png"), "--json", str(tmp_path / "e.json")]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["labels"] == ["cat", "dog", "owl"] and res["n"] == 6
    assert res["accuracy"] == 1.0  # red, green and blue pictures
    assert Image.open(tmp_path / "cm.png").size[0] > 50
    assert main(["generate", "--image", str(root / "cat" / "0.png"), str(run)]) == 2


def test_cli_caption_generate(tmp_path, capsys):
    data, run = tmp_path / "cap", tmp_path / "run"
    assert main(["prepare", "shapes-captions", "--out", str(data), "--n_train", "40", "--image_size", "16",
                 "--unnamed", "0.3"]) == 0
    assert main(["train", "--data", str(data), "--model", "caption-tiny", "--out", str(run), "--train.max_steps=3",
                 "--train.batch_size=4", "--train.eval_interval=0", "--train.eval_iters=1",
                 "--train.progress=false"]) == 0
    Image.fromarray(np.load(data / "test.images.npy")[0]).resize((23, 19)).save(tmp_path / "x.png")
    capsys.readouterr()
    assert main(["generate", "--image", str(tmp_path / "x.png"), str(run), "--temperature", "0",
                 "--max_new_tokens", "5"]) == 0
    words = capsys.readouterr().out.split()
    known = {w for line in (data / "train.captions.jsonl").read_text().splitlines()
             for w in json.loads(line)["caption"].split()}
    assert len(words) <= 5 and set(words) <= known  # (3 steps of training: maybe no words yet)
    assert main(["generate", str(run)]) == 2  # a captioner needs --image
    assert main(["eval", str(run), "--json", str(tmp_path / "e.json")]) == 0
    assert set(json.loads((tmp_path / "e.json").read_text())["per_slot"]) == {"colour", "shape", "relation",
                                                                               "colour2", "shape2"}
