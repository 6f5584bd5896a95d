"""Test helper: tiny random-weight captioners (BLIP, Florence-2) saved as model folders, the way a downloaded
model looks, with a made-up word list. A few config numbers each, no network.

Their generation config forbids the end token for the first tokens, so that random weights still say
something (a few words of the made-up list) and a test can tell a written caption from an empty one."""
from __future__ import annotations

from pathlib import Path

WORDS = "a photo of red blue cat dog house tree person on the with".split()


def tiny_blip(folder: Path) -> Path:
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = BertTokenizer(str(folder / "vocab.txt"))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    cfg = BlipConfig(text_config=dict(vocab_size=len(tok), encoder_hidden_size=32, max_position_embeddings=64,
                                      bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id,
                                      pad_token_id=tok.pad_token_id, **small),
                     vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=32)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(cfg).eval()
    model.generation_config.begin_suppress_tokens = [tok.sep_token_id, tok.pad_token_id]
    model.generation_config.suppress_tokens = [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.mask_token_id]
    model.generation_config.min_new_tokens = 3
    model.save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(folder)
    return folder


def tiny_florence(folder: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (Florence2Config, Florence2ForConditionalGeneration, Florence2Processor,
                              PreTrainedTokenizerFast)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["<pad>", "<s>", "</s>", "<unk>", "<image>", *WORDS]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    t.pre_tokenizer, t.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    vision = dict(depths=[1, 1], embed_dim=[16, 32], num_heads=[1, 2], num_groups=[1, 2], patch_size=[7, 3],
                  patch_stride=[4, 2], patch_padding=[3, 1], patch_prenorm=[False, True], window_size=2, projection_dim=32)
    text = dict(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, decoder_start_token_id=2, forced_eos_token_id=None)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(Florence2Config(text_config=text, vision_config=vision,
                                                              image_token_id=tok.image_token_id)).eval()
    model.generation_config.suppress_tokens = [0, 1, 2, 3, 4]  # words only, up to max_new_tokens
    model.generation_config.forced_eos_token_id = None
    model.save_pretrained(folder)
    # a 32 px image through two stride stages: 4 x 4 patches plus one pooled token
    ip = CLIPImageProcessorPil(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
                               do_center_crop=False, image_seq_length=17)
    Florence2Processor(image_processor=ip, tokenizer=tok).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------- a WD tagger
# Made-up tags of all three categories, as selected_tags.csv lists them (category 9 rating, 0 general, 4 character),
# each with its logit for a pure red, green and blue image: the tiny tagger's confidence is sigmoid(w . BGR / 255),
# from the mean colour of the padded, resized image. `expected` below computes what a threshold keeps.
TAGS = [  # name, category, logit when red, when green, when blue
    ("general", 9, 3.0, 0.0, -2.0), ("sensitive", 9, -1.0, 2.0, 0.0), ("questionable", 9, -3.0, -3.0, 1.0),
    ("explicit", 9, -4.0, -4.0, -4.0),
    ("red_background", 0, 4.0, -4.0, -4.0), ("long_hair", 0, 0.5, 1.5, -4.0), ("solo", 0, -0.3, 2.5, 2.5),
    ("^_^", 0, 1.0, -4.0, -4.0), ("simple_background", 0, 2.0, 2.0, 2.0), ("blue_theme", 0, -4.0, -4.0, 3.0),
    ("hero_(series)", 4, 2.5, -4.0, -4.0), ("villain", 4, 0.8, 0.8, 3.0),
]
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def tiny_tagger(folder: Path, size: int = 16, batch: int | None = None) -> Path:
    """A WD-tagger-shaped ONNX model: NHWC float32 BGR input of `size`, one sigmoid score per tag."""
    import csv

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    # logits = mean(BGR) / 255 @ W: rows B, G, R (the model sees BGR)
    w = np.array([[t[4] for t in TAGS], [t[3] for t in TAGS], [t[2] for t in TAGS]], dtype=np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["input", "axes"], ["mean"], keepdims=0),
        helper.make_node("Div", ["mean", "scale"], ["unit"]),
        helper.make_node("MatMul", ["unit", "w"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["output"]),
    ]
    inits = [numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
             numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"), numpy_helper.from_array(w, "w")]
    n = batch if batch else "batch"
    graph = helper.make_graph(nodes, "tiny_tagger",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [n, size, size, 3])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [n, len(TAGS)])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    with open(folder / "selected_tags.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["tag_id", "name", "category", "count"])
        for i, (name, cat, *_) in enumerate(TAGS):
            out.writerow([i, name, cat, 1000 - i])
    return folder


def expected(colour: str, general: float = 0.35, character: float = 0.85, ratings: bool = False) -> list[str]:
    """The tags a pure-colour image gets, most confident first, with underscores kept (the caller applies the rule)."""
    import math

    col = list(COLOURS).index(colour)
    prob = {name: 1 / (1 + math.exp(-logits[col])) for name, _, *logits in TAGS}
    cat = {name: c for name, c, *_ in TAGS}
    keep = [n for n in prob if (cat[n] == 0 and prob[n] >= general) or (cat[n] == 4 and prob[n] >= character)]
    if ratings:
        keep.append(max((n for n in prob if cat[n] == 9), key=prob.get))
    return sorted(keep, key=lambda n: -prob[n])
