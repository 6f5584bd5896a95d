"""Captions: trigger words, prefix/suffix, tag shuffle with kept tags, dropout, tag statistics."""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def join_tags(tags: list[str]) -> str:
    return ", ".join(tags)


def has_trigger(caption: str, trigger: str) -> bool:
    low = caption.lower()
    return trigger.lower() in (t.lower() for t in split_tags(caption)) or f" {trigger.lower()} " in f" {low} "


def with_triggers(caption: str, triggers: list[str]) -> str:
    """Put any trigger word the caption lacks at its front; leave present ones where they are."""
    missing = [t for t in triggers if not has_trigger(caption, t)]
    return join_tags(missing + split_tags(caption)) if missing else caption


@dataclass(frozen=True)
class CaptionOptions:
    triggers: tuple[str, ...] = ()
    class_caption: str = ""
    prefix: str = ""
    suffix: str = ""
    shuffle_tags: bool = False
    keep_tokens: int = 1
    caption_dropout: float = 0.0
    tag_dropout: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> "CaptionOptions":
        return cls(
            tuple(cfg.trigger_words),
            cfg.class_caption,
            cfg.caption_prefix,
            cfg.caption_suffix,
            cfg.shuffle_tags,
            cfg.keep_tokens,
            cfg.caption_dropout,
            cfg.tag_dropout,
        )

    @property
    def is_random(self) -> bool:
        return self.shuffle_tags or self.caption_dropout > 0 or self.tag_dropout > 0


def base_caption(raw: str | None, opts: CaptionOptions) -> tuple[list[str], int]:
    """Tags of the caption before randomisation, and how many leading tags stay in place.

    The trigger words lead every caption, wherever the caption had them: a tag that is a trigger moves to the
    front, one that only mentions it ('photo of zwx') moves right behind, a missing trigger is added. The prefix
    follows. keep_tokens counts from the caption's own start, as in kohya: a trigger the caption already had is
    one of the kept tags, one we added is not. Shuffle and tag dropout touch only what comes after."""
    text = raw if raw and raw.strip() else opts.class_caption
    tags = split_tags(text)
    is_trigger = {t.lower() for t in opts.triggers}
    present = {t.lower() for t in tags}
    mentioning = [t for t in tags if t.lower() not in is_trigger and any(has_trigger(t, trig) for trig in opts.triggers)]
    triggers = [t for t in opts.triggers if t.lower() in present or not any(has_trigger(tag, t) for tag in tags)]
    from_caption = sum(t.lower() in present for t in triggers) + len(mentioning)
    lead = [t for t in split_tags(opts.prefix) if t.lower() not in is_trigger]
    head = triggers + mentioning + lead
    rest = [t for t in tags if t.lower() not in is_trigger and t not in mentioning]
    keep = len(head) + max(0, opts.keep_tokens - from_caption)
    return head + rest + split_tags(opts.suffix), keep


def build_caption(raw: str | None, opts: CaptionOptions, rng: random.Random | None = None) -> str:
    """The caption an image is trained with this time. `rng` drives shuffle and dropout."""
    tags, keep = base_caption(raw, opts)
    if rng is None or not opts.is_random:
        return join_tags(tags)
    if opts.caption_dropout and rng.random() < opts.caption_dropout:
        return ""
    fixed, rest = tags[:keep], tags[keep:]
    if opts.tag_dropout:
        rest = [t for t in rest if rng.random() >= opts.tag_dropout]
    if opts.shuffle_tags:
        rng.shuffle(rest)
    return join_tags(fixed + rest)


def tag_frequency(captions: list[str | None]) -> dict[str, int]:
    """kohya's ss_tag_frequency counting: split on commas, strip, lowercase."""
    c = Counter()
    for cap in captions:
        if cap:
            c.update(t.lower() for t in split_tags(cap))
    return dict(c.most_common())
