"""Embedded default data: a small simulated online shop's search logs and relevance judgments.

Why a simulator rather than a shipped file: the pipeline must run end to end with no input and
no download, and the data has to exercise the things the models are meant to learn. A uniform
toy set would let a bag-of-words model look perfect, so the shop is built around the hard
parts of real e-commerce search:

* Shared surface tokens. Brand names collide across categories on purpose ("MAC" laptops and
  MAC lipstick, "Ring" doorbells and jewellery rings, "Delta" faucets and drills), and numeric
  attributes with different units share numbers (1.7GHz vs 1.7ml). Text similarity alone is
  therefore a noisy relevance signal.
* Hidden intent. Every query string has one hidden intent (category + optional brand + optional
  attribute) that decides true relevance. About a fifth of the queries are ambiguous by text
  ("mac 1.7", "ring 4"): their words match two intents equally and only the intent, visible
  through clicks, tells them apart. The same intent is also issued as less ambiguous sibling
  queries that click the same items, so the query-item click graph carries information the
  text lacks.
* Realistic noise. Query popularity is a power law, the engine retrieves by a noisy normalised
  text match, users click with a position bias, and judgments are the mean of three noisy
  raters on the Home Depot 1..3 scale. A query's log rows are in the order its results were shown
  (position is not a column, as in many real exports); judgments are sorted by item instead.
* Faults. A few deliberately broken rows are mixed into the CSVs so the ingestion's validation
  and quarantine paths run on every default run.

Everything comes from `numpy.random.default_rng` streams spawned from the spec's seed (never
Python's `random` or `hash()`, which is salted per process), so a spec always gives the same
bytes.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple, TypeVar

import numpy as np

T = TypeVar("T")

LOG_COLUMNS = ("query", "item_id", "item_title", "impressions", "clicks", "purchases")
JUDGMENT_COLUMNS = ("query", "item_id", "relevance")
TRUTH_COLUMNS = ("query", "item_id", "true_relevance", "intent")

LOG_FAULT_KINDS = (
    "empty_query",
    "missing_item_id",
    "clicks_gt_impressions",
    "negative_impressions",
    "non_numeric_count",
    "duplicate_pair",
)
JUDGMENT_FAULT_KINDS = ("relevance_out_of_range", "non_numeric_relevance", "duplicate_key")


@dataclasses.dataclass(frozen=True)
class ShopSpec:
    seed: int = 20221207
    num_items: int = 1500
    num_queries: int = 400
    results_per_query: int = 20  # items shown per query (the logged result list)
    judged_query_fraction: float = 0.35  # fraction of queries whose pairs get human judgments
    fault_rate: float = 0.002  # fraction of extra deliberately broken log/judgment rows (0 disables)


@dataclasses.dataclass
class ShopData:
    """The generated tables as lists of dict rows, in file order (fault rows included)."""

    logs: List[dict]
    judgments: List[dict]
    truth: List[dict]  # query, item_id, true_relevance (0..3), intent; one per logged clean pair
    catalogue: List[dict]  # item_id, title, category, brand, attributes
    faults: List[dict]  # table ("logs" | "judgments"), index (row position in that table), kind


# --------------------------------------------------------------------------------------------
# The shop's vocabulary
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Slot:
    name: str
    values: Tuple[str, ...]
    title_fmt: str = "{v}"
    query_fmts: Tuple[str, ...] = ("{v}",)
    numeric: bool = False  # numeric values can collide with other categories' numbers


@dataclasses.dataclass(frozen=True)
class Category:
    key: str
    title_noun: str
    query_nouns: Tuple[str, ...]  # what shoppers type for the noun (synonyms)
    brands: Tuple[str, ...]
    lines: Tuple[str, ...]
    slots: Tuple[Slot, ...]
    template: str  # str.format over brand, line, noun and the slot names


def _units(unit: str, spaced: bool = True) -> Tuple[str, ...]:
    """Query spellings of a unit: '1.7ghz', '1.7 ghz', '1.7 GHz', '1.7GHz'."""
    low = unit.lower()
    forms = ["{v}" + low, "{v} " + low, "{v} " + unit, "{v}" + unit]
    return tuple(forms if spaced else forms[::3])


_COLOURS_TECH = ("Space Gray", "Silver", "Midnight", "Black", "Blue")

CATEGORIES: Tuple[Category, ...] = (
    Category(
        "laptops", "Laptop", ("laptop", "notebook", "laptop computer"),
        ("MAC", "Dell", "Lenovo", "HP", "Asus"), ("Pro", "Air", "Book", "Slim", "Plus"),
        (Slot("cpu", ("1.4", "1.7", "2.0", "2.3", "2.6", "3.0", "3.5"), "{v}GHz", _units("GHz"), True),
         Slot("ram", ("8", "16", "32"), "{v}GB", _units("GB") + ("{v}gb ram",), True),
         Slot("colour", _COLOURS_TECH[:4])),
        "{brand} {line} {cpu} {ram} {noun} {colour}"),
    Category(
        "tablets", "Tablet", ("tablet", "tab", "tablet computer"),
        ("Apple", "Samsung", "Lenovo", "Amazon"), ("Air", "Mini", "Pro", "Lite"),
        (Slot("storage", ("64", "128", "256", "512"), "{v}GB", _units("GB"), True),
         Slot("screen", ("8", "10.9", "11", "12.9"), "{v} in.", ("{v} in", "{v} inch", "{v}in", "{v}-inch"), True),
         Slot("colour", ("Space Gray", "Silver", "Blue", "Pink"))),
        "{brand} {line} {screen} {noun} {storage} {colour}"),
    Category(
        "phones", "Smartphone", ("smartphone", "phone", "cell phone", "mobile phone"),
        ("Apple", "Samsung", "Google", "Motorola"), ("Pro", "Max", "Plus", "Ultra", "Lite"),
        (Slot("storage", ("64", "128", "256", "512"), "{v}GB", _units("GB"), True),
         Slot("colour", ("Black", "White", "Blue", "Purple"))),
        "{brand} {line} {storage} Unlocked {noun} {colour}"),
    Category(
        "headphones", "Wireless Headphones",
        ("wireless headphones", "bluetooth headphones", "headphones", "headset"),
        ("Sony", "Bose", "JBL", "Beats", "Sennheiser"), ("Noise Cancelling", "Over-Ear", "On-Ear", "Sport"),
        (Slot("battery", ("20", "30", "40", "50"), "{v}-Hour Battery",
              ("{v} hour battery", "{v}h battery", "{v} hr", "{v} hours"), True),
         Slot("colour", ("Black", "Silver", "Midnight Blue", "White"))),
        "{brand} {line} {noun} {battery} {colour}"),
    Category(
        "tvs", "Smart TV", ("smart tv", "tv", "television", "flat screen tv"),
        ("Samsung", "LG", "Sony", "Philips", "TCL"), ("4K UHD", "QLED", "OLED", "LED"),
        (Slot("size", ("32", "40", "43", "50", "55", "60", "65", "75"), "{v} in.",
              ("{v} in", "{v} inch", "{v}in", "{v}-inch"), True),),
        "{brand} {size} {line} {noun}"),
    Category(
        "lipstick", "Lipstick", ("lipstick", "lip stick", "lip color"),
        ("MAC", "Maybelline", "Revlon", "L'Oreal", "NYX"), ("Matte", "Satin", "Cream", "Gloss", "Pro Longwear"),
        (Slot("size", ("1.4", "1.7", "2.0", "2.3", "3.0", "3.5"), "{v}ml", _units("ml"), True),
         Slot("shade", ("Ruby Woo", "Velvet Teddy", "Russian Red", "Nude", "Coral Crush", "Plum",
                        "Rose", "Berry", "Mocha", "Pink Nouveau"))),
        "{brand} {line} {noun} {size} {shade}"),
    Category(
        "rings", "Ring", ("ring", "band"),
        ("Pandora", "Kay", "Zales", "Tiffany"), ("Solitaire", "Eternity", "Halo", "Signet"),
        (Slot("metal", ("Sterling Silver", "14K Gold", "Rose Gold", "Platinum")),
         Slot("size", ("3", "4", "5", "6", "7", "8", "9"), "Size {v}", ("size {v}", "sz {v}", "size {v} ring"), True)),
        "{brand} {metal} {line} {noun} {size}"),
    Category(
        "doorbells", "Video Doorbell", ("video doorbell", "doorbell camera", "smart doorbell", "doorbell"),
        ("Ring", "Nest", "Eufy", "Arlo"), ("Wired", "Battery", "Plus", "Elite"),
        (Slot("gen", ("2", "3", "4", "5"), "Gen {v}", ("gen {v}", "{v}th gen", "generation {v}"), True),
         Slot("resolution", ("1080p", "1536p", "2K")),
         Slot("finish", ("Satin Nickel", "Venetian Bronze", "Black"))),
        "{brand} {line} {noun} {gen} {resolution} {finish}"),
    Category(
        "drills", "Cordless Drill", ("cordless drill", "battery drill", "drill driver", "power drill"),
        ("DeWalt", "Makita", "Ryobi", "Milwaukee", "Delta"), ("Compact", "Brushless", "Hammer", "XR"),
        (Slot("voltage", ("12", "18", "20"), "{v}V", ("{v}v", "{v} volt", "{v}V", "{v}-volt"), True),
         Slot("battery", ("1.5", "2.0", "4.0", "5.0"), "{v}Ah", _units("Ah"), True)),
        "{brand} {voltage} {line} {noun} Kit with {battery} Battery"),
    Category(
        "paint", "Interior Paint", ("interior paint", "wall paint", "paint"),
        ("Behr", "Valspar", "Glidden", "Sherwin-Williams"), ("Premium Plus", "Marquee", "Signature", "Duramax"),
        (Slot("volume", ("8", "32", "128"), "{v} oz.", ("{v} oz", "{v}oz", "{v} ounce"), True),
         Slot("sheen", ("Flat", "Eggshell", "Satin", "Semi-Gloss")),
         Slot("colour", ("Ultra Pure White", "Swiss Coffee", "Agreeable Gray", "Navy Blue", "Sage Green"))),
        "{brand} {line} {volume} {sheen} {noun} {colour}"),
    Category(
        "faucets", "Kitchen Faucet", ("kitchen faucet", "sink faucet", "kitchen tap", "faucet"),
        ("Delta", "Moen", "Kohler", "Pfister", "Glacier Bay"), ("Essa", "Arbor", "Cruz", "Leland", "Trinsic"),
        (Slot("handles", ("1", "2"), "{v}-Handle", ("{v} handle", "{v}-handle"), True),
         Slot("finish", ("Chrome", "Brushed Nickel", "Matte Black", "Oil Rubbed Bronze")),
         Slot("flow", ("1.2", "1.5", "1.8", "2.0", "2.2"), "{v} GPM", _units("GPM"), True)),
        "{brand} {line} {handles} Pull-Down {noun} in {finish} {flow}"),
    Category(
        "light_bulbs", "LED Light Bulb", ("led light bulb", "light bulb", "led bulb", "bulb"),
        ("Philips", "GE", "Cree", "Sylvania", "Feit"), ("Soft White", "Daylight", "Bright White"),
        (Slot("watt", ("40", "60", "75", "100"), "{v}W Equivalent",
              ("{v}w", "{v} watt", "{v}W", "{v} w equivalent"), True),
         Slot("shape", ("A19", "BR30", "PAR38")),
         Slot("pack", ("1", "4", "8", "16"), "({v}-Pack)", ("{v} pack", "{v}-pack", "{v}pk"), True)),
        "{brand} {watt} {shape} {line} {noun} {pack}"),
    Category(
        "screws", "Wood Screws", ("wood screws", "deck screws", "screws", "wood screw"),
        ("GRK", "Everbilt", "SPAX", "Hillman"), ("Star Drive", "Phillips Head", "Square Drive"),
        (Slot("length", ("16", "20", "25", "30", "40", "50"), "{v} mm", _units("mm"), True),
         Slot("finish", ("Zinc", "Stainless Steel", "Black Phosphate")),
         Slot("count", ("25", "50", "100"), "({v}-Pack)", ("{v} pack", "{v}-pack", "{v} pcs"), True)),
        "{brand} {length} {line} {finish} {noun} {count}"),
    Category(
        "hoses", "Garden Hose", ("garden hose", "water hose", "hose"),
        ("Flexzilla", "Gilmour", "Melnor", "Zero-G"), ("Heavy Duty", "Lightweight", "Expandable", "Kink-Free"),
        (Slot("length", ("25", "50", "75", "100"), "{v} ft.", ("{v} ft", "{v}ft", "{v} foot", "{v} feet"), True),
         Slot("diameter", ("1/2", "5/8", "3/4"), "{v} in.", ("{v} in", "{v} inch", "{v}\""), True),
         Slot("colour", ("Green", "Black", "Blue"))),
        "{brand} {diameter} x {length} {line} {noun} {colour}"),
)
_CATEGORY_BY_KEY: Dict[str, Category] = {c.key: c for c in CATEGORIES}

# Text-ambiguous intent pairs: (shared token, ((category, brand or None, slot), ...), words in both
# sides' titles). The token is a brand on one side and a brand or the category noun on the other;
# the slots share numbers, so "mac 1.7" or "mac pro 1.7" fit a laptop and a lipstick alike.
AmbiguousSide = Tuple[str, Optional[str], str]
AMBIGUOUS_GROUPS: Tuple[Tuple[str, Tuple[AmbiguousSide, AmbiguousSide], Tuple[str, ...]], ...] = (
    ("mac", (("laptops", "MAC", "cpu"), ("lipstick", "MAC", "size")), ("pro",)),
    ("ring", (("doorbells", "Ring", "gen"), ("rings", None, "size")), ()),
    ("delta", (("faucets", "Delta", "flow"), ("drills", "Delta", "battery")), ()),
    ("apple", (("phones", "Apple", "storage"), ("tablets", "Apple", "storage")), ("pro", "lite")),
    ("samsung", (("phones", "Samsung", "storage"), ("tablets", "Samsung", "storage")), ("pro", "lite")),
    ("philips", (("light_bulbs", "Philips", "watt"), ("tvs", "Philips", "size")), ()),
    ("sony", (("headphones", "Sony", "battery"), ("tvs", "Sony", "size")), ()),
)

# Click and purchase propensities by true relevance 0..3.
ATTRACTIVENESS = np.array([0.01, 0.05, 0.16, 0.42])
PURCHASE_RATE = np.array([0.002, 0.01, 0.04, 0.12])
POSITION_BIAS_POWER = 0.7
PAGE_SIZE = 10
PAGE_TWO_VIEW_RATE = 0.35  # most searchers never reach the second page
AMBIGUOUS_QUERY_SHARE = 0.22  # of the query strings; some more arise by chance ("ring")
RATER_FLIP_RATE = 0.2


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"\d+(?:\.\d+)?|[a-z]+")


def _canon_number(token: str) -> str:
    # "2.0" and "2" are the same number to a shopper and to the engine.
    return token.rstrip("0").rstrip(".") if "." in token else token


def _tokens(text: str) -> List[str]:
    return [_canon_number(t) if t[0].isdigit() else t for t in _TOKEN_RE.findall(text.lower())]


def _pick(rng: np.random.Generator, seq: Sequence[T]) -> T:
    # Index explicitly: rng.choice on strings returns numpy scalars, not str.
    return seq[int(rng.integers(len(seq)))]


def _squash(text: str) -> str:
    return " ".join(text.split())


@dataclasses.dataclass(frozen=True)
class Item:
    index: int
    category: str
    brand: str
    line: str
    attrs: Tuple[Tuple[str, str], ...]
    title: str
    item_id: str = ""

    def attr(self, name: str) -> str:
        return dict(self.attrs)[name]


@dataclasses.dataclass(frozen=True)
class Intent:
    category: str
    brand: Optional[str] = None
    slot: Optional[str] = None
    value: Optional[str] = None

    def label(self) -> str:
        attr = f"{self.slot}={self.value}" if self.slot else "*"
        return f"{self.category}|{self.brand or '*'}|{attr}"


@dataclasses.dataclass(frozen=True)
class Query:
    text: str  # what the shopper typed
    canonical: str  # what the engine understands after spelling, synonym and unit normalisation
    intent: Intent
    ambiguous: bool


# --------------------------------------------------------------------------------------------
# Catalogue
# --------------------------------------------------------------------------------------------


def _render_title(cat: Category, brand: str, line: str, attrs: Dict[str, str]) -> str:
    fields = {s.name: s.title_fmt.format(v=attrs[s.name]) for s in cat.slots}
    return _squash(cat.template.format(brand=brand, line=line, noun=cat.title_noun, **fields))


def _draw_item(cat: Category, rng: np.random.Generator, fixed: Dict[str, str],
               used_titles: set) -> Tuple[str, str, Dict[str, str], str]:
    for _ in range(50):
        brand = fixed.get("brand") or _pick(rng, cat.brands)
        line = fixed.get("line") or _pick(rng, cat.lines)
        attrs = {s.name: fixed.get(s.name) or _pick(rng, s.values) for s in cat.slots}
        title = _render_title(cat, brand, line, attrs)
        if title not in used_titles:
            return brand, line, attrs, title
    # A crowded category (huge num_items) still gets unique titles.
    suffix = 2
    while f"{title} v{suffix}" in used_titles:
        suffix += 1
    return brand, line, attrs, f"{title} v{suffix}"


def _shared_numbers(side_a: Tuple[str, Optional[str], str],
                    side_b: Tuple[str, Optional[str], str]) -> List[Tuple[str, str, str]]:
    """(canonical number, side-a value, side-b value) for numbers both slots can take."""
    def values(side: Tuple[str, Optional[str], str]) -> Dict[str, str]:
        slot = next(s for s in _CATEGORY_BY_KEY[side[0]].slots if s.name == side[2])
        return {_canon_number(v): v for v in slot.values}

    a, b = values(side_a), values(side_b)
    return [(n, a[n], b[n]) for n in sorted(a.keys() & b.keys(), key=float)]


def _build_catalogue(spec: ShopSpec, rng: np.random.Generator) -> Tuple[List[Item], np.ndarray]:
    drafts: List[Tuple[str, str, str, Dict[str, str], str]] = []
    used: set = set()

    def add(cat: Category, fixed: Dict[str, str]) -> None:
        brand, line, attrs, title = _draw_item(cat, rng, fixed, used)
        used.add(title)
        drafts.append((cat.key, brand, line, attrs, title))

    # Guarantee every ambiguous reading ("mac 1.7", "mac pro 1.7") has an exact item on both sides,
    # whatever the sampling does.
    for _, sides, shared_words in AMBIGUOUS_GROUPS:
        for number, value_a, value_b in _shared_numbers(*sides):
            for (cat_key, brand, slot), value in zip(sides, (value_a, value_b)):
                cat = _CATEGORY_BY_KEY[cat_key]
                fixed = {slot: value, **({"brand": brand} if brand else {})}
                add(cat, fixed)
                for word in shared_words:
                    add(cat, {**fixed, "line": next(ln for ln in cat.lines if word in _tokens(ln))})

    # The rest: categories of uneven size, like a real shop's assortment.
    remaining = spec.num_items - len(drafts)
    shares = rng.dirichlet(np.full(len(CATEGORIES), 8.0))
    counts = rng.multinomial(remaining, shares)
    for cat, count in zip(CATEGORIES, counts):
        for _ in range(int(count)):
            add(cat, {})

    # Ids in shuffled order so that an id says nothing about the category.
    order = rng.permutation(len(drafts))
    items = []
    for new_index, old_index in enumerate(order):
        cat_key, brand, line, attrs, title = drafts[int(old_index)]
        items.append(Item(new_index, cat_key, brand, line, tuple(attrs.items()), title,
                          item_id=f"P{new_index + 1:06d}"))
    # Some items simply look better in results (picture, price): a per-item click multiplier.
    appeal = rng.lognormal(0.0, 0.25, size=len(items))
    return items, appeal


# --------------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------------


def _typo(text: str, rng: np.random.Generator) -> str:
    """One keyboard slip (swap, drop or double a letter) in one word; the first letter survives."""
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not candidates:
        return text
    i = _pick(rng, candidates)
    word = words[i]
    j = int(rng.integers(1, len(word) - 1))
    op = int(rng.integers(3))
    if op == 0 and word[j] != word[j + 1]:
        word = word[:j] + word[j + 1] + word[j] + word[j + 2:]
    elif op == 2:
        word = word[:j] + word[j] + word[j:]
    else:
        word = word[:j] + word[j + 1:]
    words[i] = word
    return " ".join(words)


def _number_surface(value: str, rng: np.random.Generator) -> str:
    # "2.0" is typed as "2" about half the time.
    return value[:-2] if value.endswith(".0") and rng.random() < 0.5 else value


def _render_query(intent: Intent, rng: np.random.Generator, allow_bare: bool,
                  typo_rate: float) -> Tuple[str, str]:
    """(surface text, canonical text) of an intent that states all its parts."""
    cat = _CATEGORY_BY_KEY[intent.category]
    parts: Dict[str, Tuple[str, str]] = {}
    parts["noun"] = (_pick(rng, cat.query_nouns), cat.title_noun.lower())
    if intent.brand:
        parts["brand"] = (intent.brand.lower(), intent.brand.lower())
    if intent.slot:
        slot = next(s for s in cat.slots if s.name == intent.slot)
        value = intent.value or ""
        surface = _pick(rng, slot.query_fmts).format(v=_number_surface(value, rng) if slot.numeric else value)
        parts["attr"] = (surface.lower() if rng.random() < 0.7 else surface, slot.title_fmt.format(v=value).lower())
        # A brand plus a unit ("mac 1.7ghz") already says what it is; shoppers then skip the noun.
        if allow_bare and intent.brand and slot.numeric and rng.random() < 0.2:
            del parts["noun"]
    u = rng.random()
    order = (("brand", "noun", "attr") if u < 0.55 else ("brand", "attr", "noun") if u < 0.8
             else ("attr", "brand", "noun") if u < 0.9 else ("noun", "attr", "brand"))
    chosen = [parts[k] for k in order if k in parts]
    surface = " ".join(p[0] for p in chosen)
    if rng.random() < typo_rate:
        surface = _typo(surface, rng)
    return _squash(surface), _squash(" ".join(p[1] for p in chosen))


def _ambiguous_candidates(rng: np.random.Generator) -> List[Query]:
    """Queries like "mac 1.7" whose words fit two intents equally; the hidden side is a coin flip."""
    out: List[Query] = []
    for token, sides, shared_words in AMBIGUOUS_GROUPS:
        for number, value_a, value_b in _shared_numbers(*sides):
            values = (value_a, value_b)
            plain = f"{token} {number}"
            # (surface, canonical): the engine reads every form as the plain one.
            forms = [(plain, plain), (f"{number} {token}", plain)]
            forms += [(f"{token} {word} {number}",) * 2 for word in shared_words]
            if "." not in number and "." in value_a + value_b:
                forms.append((f"{token} {number}.0", plain))
            slipped = _typo(token, rng)
            if slipped != token:
                forms.append((f"{slipped} {number}", plain))
            for surface, canonical in forms:
                side = int(rng.integers(2))
                cat_key, brand, slot = sides[side]
                intent = Intent(cat_key, brand, slot, values[side])
                out.append(Query(surface, canonical, intent, ambiguous=True))
    return out


def _random_intent(items: List[Item], rng: np.random.Generator) -> Intent:
    # Anchor on a real item so that every intent has at least one exact match.
    item = items[int(rng.integers(len(items)))]
    cat = _CATEGORY_BY_KEY[item.category]
    brand = item.brand if rng.random() < 0.6 else None
    slot = _pick(rng, cat.slots).name if rng.random() < 0.55 else None
    return Intent(item.category, brand, slot, item.attr(slot) if slot else None)


def _build_queries(spec: ShopSpec, items: List[Item], rng: np.random.Generator) -> List[Query]:
    queries: Dict[str, Query] = {}

    def add(query: Query) -> bool:
        if len(queries) >= spec.num_queries or not query.text or query.text in queries:
            return False
        queries[query.text] = query
        return True

    candidates = _ambiguous_candidates(rng)
    order = rng.permutation(len(candidates))
    target = int(round(AMBIGUOUS_QUERY_SHARE * spec.num_queries))
    ambiguous_intents: Dict[Intent, None] = {}  # ordered set
    for k in order[:target]:
        if add(candidates[int(k)]):
            ambiguous_intents[candidates[int(k)].intent] = None

    # Siblings: the same shoppers also type the explicit form, which clicks the same items.
    for intent in ambiguous_intents:
        for _ in range(1 + int(rng.integers(2))):
            text, canonical = _render_query(intent, rng, allow_bare=False, typo_rate=0.05)
            add(Query(text, canonical, intent, ambiguous=False))

    attempts = 0
    while len(queries) < spec.num_queries:
        attempts += 1
        if attempts > 100 * spec.num_queries:
            raise SpecError(f"could not make {spec.num_queries} distinct queries; lower num_queries")
        intent = _random_intent(items, rng)
        for _ in range(int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))):
            text, canonical = _render_query(intent, rng, allow_bare=True, typo_rate=0.12)
            add(Query(text, canonical, intent, ambiguous=False))

    listed = list(queries.values())
    # Shuffle so that file order says nothing about how a query was made.
    return [listed[int(k)] for k in rng.permutation(len(listed))]


def _query_frequencies(n: int, rng: np.random.Generator) -> np.ndarray:
    """Searches per query: Zipf-like, a few thousand for the head, 1-3 for the tail."""
    popularity_rank = rng.permutation(n) + 1
    raw = 2500.0 * popularity_rank ** -1.25 * rng.lognormal(0.0, 0.25, size=n)
    return np.maximum(1, np.round(raw)).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Relevance, retrieval and behaviour
# --------------------------------------------------------------------------------------------


def _identity_tokens(intent: Intent) -> set:
    """Tokens that make an item of another category a look-alike: the brand or the noun."""
    tokens = set(_tokens(_CATEGORY_BY_KEY[intent.category].title_noun))
    if intent.brand:
        tokens |= set(_tokens(intent.brand))
    return tokens


def _true_relevance(intent: Intent, item: Item, item_tokens: set) -> int:
    if item.category == intent.category:
        checks = []
        if intent.brand:
            checks.append(item.brand == intent.brand)
        if intent.slot:
            checks.append(item.attr(intent.slot) == intent.value)
        if all(checks):
            return 3
        return 2 if any(checks) else 1
    return 1 if _identity_tokens(intent) & item_tokens else 0


def _token_index(items: List[Item]) -> Dict[str, np.ndarray]:
    index: Dict[str, List[int]] = {}
    for item in items:
        for token in dict.fromkeys(_tokens(item.title)):
            index.setdefault(token, []).append(item.index)
    return {t: np.array(ix, dtype=np.int64) for t, ix in index.items()}


def _retrieve(query: Query, index: Dict[str, np.ndarray], n_items: int, k: int,
              rng: np.random.Generator) -> np.ndarray:
    """The engine: noisy token overlap on the normalised query, some filler, a noisy order."""
    overlap = np.zeros(n_items)
    for token in dict.fromkeys(_tokens(query.canonical)):
        if token in index:
            overlap[index[token]] += 1.0
    noisy = overlap + rng.normal(0.0, 0.35, size=n_items)
    shown = np.argsort(-noisy, kind="stable")[:k]
    # Boosted or sponsored slots: random filler the text match would never pick.
    taken = set(shown.tolist())
    for slot in np.flatnonzero(rng.random(k) < 0.08):
        filler = int(rng.integers(n_items))
        if filler not in taken:
            taken.discard(int(shown[slot]))
            taken.add(filler)
            shown[slot] = filler
    # Ranking is imperfect too: order by overlap blurred with noise.
    order = np.argsort(-(overlap[shown] + rng.normal(0.0, 0.8, size=k)), kind="stable")
    return shown[order]


def _position_bias(k: int) -> np.ndarray:
    return (1.0 + np.arange(k)) ** -POSITION_BIAS_POWER


def _simulate_pairs(queries: List[Query], items: List[Item], appeal: np.ndarray, spec: ShopSpec,
                    rng: np.random.Generator) -> Tuple[List[dict], List[dict], List[np.ndarray]]:
    index = _token_index(items)
    item_tokens = [set(_tokens(item.title)) for item in items]
    frequency = _query_frequencies(len(queries), rng)
    k = spec.results_per_query
    view_rate = np.where(np.arange(k) < PAGE_SIZE, 1.0, PAGE_TWO_VIEW_RATE)
    bias = _position_bias(k)
    logs: List[dict] = []
    truth: List[dict] = []
    relevance_by_query: List[np.ndarray] = []
    for query, searches in zip(queries, frequency):
        shown = _retrieve(query, index, len(items), k, rng)
        relevance = np.array([_true_relevance(query.intent, items[i], item_tokens[i]) for i in shown])
        # Every listed item was seen at least once, otherwise it would not be in the log.
        impressions = np.maximum(1, rng.binomial(int(searches), view_rate))
        click_rate = np.minimum(0.95, bias * ATTRACTIVENESS[relevance] * appeal[shown])
        clicks = rng.binomial(impressions, click_rate)
        purchases = rng.binomial(clicks, PURCHASE_RATE[relevance])
        label = query.intent.label()
        for j, i in enumerate(shown):
            item = items[int(i)]
            logs.append({"query": query.text, "item_id": item.item_id, "item_title": item.title,
                         "impressions": int(impressions[j]), "clicks": int(clicks[j]),
                         "purchases": int(purchases[j])})
            truth.append({"query": query.text, "item_id": item.item_id,
                          "true_relevance": int(relevance[j]), "intent": label})
        relevance_by_query.append(relevance)
    return logs, truth, relevance_by_query


def _rater_grades(relevance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Three raters per pair on 1..3: the grade nearest their reading, sometimes a neighbour."""
    latent = 1.0 + 2.0 * relevance[:, None] / 3.0 + np.zeros((1, 3))
    grades = np.floor(latent) + (rng.random(latent.shape) < latent - np.floor(latent))
    flip = rng.random(latent.shape) < RATER_FLIP_RATE
    step = np.where(rng.random(latent.shape) < 0.5, -1.0, 1.0)
    return np.clip(grades + flip * step, 1.0, 3.0)


def _simulate_judgments(queries: List[Query], logs: List[dict], relevance_by_query: List[np.ndarray],
                        spec: ShopSpec, rng: np.random.Generator) -> List[dict]:
    n_judged = int(round(spec.judged_query_fraction * len(queries)))
    judged = np.sort(rng.choice(len(queries), size=n_judged, replace=False))
    k = spec.results_per_query
    rows: List[dict] = []
    for q in judged:
        pairs = logs[q * k:(q + 1) * k]
        grades = _rater_grades(relevance_by_query[q], rng)
        means = [round(float(g), 2) for g in grades.mean(axis=1)]
        # Sorted by item so that the judgment file does not leak the result order.
        for pair, mean in sorted(zip(pairs, means), key=lambda pm: pm[0]["item_id"]):
            rows.append({"query": pair["query"], "item_id": pair["item_id"], "relevance": mean})
    return rows


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------


def _fault_count(rows: int, kinds: int, rate: float) -> int:
    return 0 if rate <= 0 else max(kinds, int(round(rate * rows)))


def _unshown_item(query: str, shown_by_query: Dict[str, set], items: List[Item],
                  rng: np.random.Generator) -> Item:
    # A fresh key, so that a broken value is not also a duplicate of a clean row.
    while True:
        item = items[int(rng.integers(len(items)))]
        if item.item_id not in shown_by_query.get(query, ()):
            return item


def _broken_log_row(kind: str, base: dict, fresh: Item, rng: np.random.Generator) -> dict:
    row = dict(base, item_id=fresh.item_id, item_title=fresh.title)
    if kind == "empty_query":
        row["query"] = ""
    elif kind == "missing_item_id":
        row = dict(base, item_id="")
    elif kind == "clicks_gt_impressions":
        row["clicks"] = row["impressions"] + 1 + int(rng.integers(5))
    elif kind == "negative_impressions":
        row["impressions"] = -int(rng.integers(1, 50))
    elif kind == "non_numeric_count":
        row[_pick(rng, ("impressions", "clicks", "purchases"))] = "n/a"
    return row


def _broken_judgment_row(kind: str, base: dict, fresh: Item, rng: np.random.Generator) -> dict:
    row = dict(base, item_id=fresh.item_id)
    if kind == "relevance_out_of_range":
        row["relevance"] = _pick(rng, (5, 0, 4, -1))
    elif kind == "non_numeric_relevance":
        row["relevance"] = _pick(rng, ("n/a", "high", "?"))
    return row


def _inject_faults(rows: List[dict], table: str, kinds: Tuple[str, ...], duplicate_kind: str,
                   spec: ShopSpec, items: List[Item], rng: np.random.Generator) -> Tuple[List[dict], List[dict]]:
    """Inserts broken rows at seeded positions; returns the new rows and where the faults are."""
    n = _fault_count(len(rows), len(kinds), spec.fault_rate)
    if n == 0 or not rows:
        return rows, []
    shown_by_query: Dict[str, set] = {}
    for row in rows:
        shown_by_query.setdefault(row["query"], set()).add(row["item_id"])
    out = list(rows)
    made: List[Tuple[dict, str]] = []
    broken = _broken_log_row if table == "logs" else _broken_judgment_row
    for f in range(n):
        kind = kinds[f % len(kinds)]
        base = rows[int(rng.integers(len(rows)))]
        if kind == duplicate_kind:
            # After its original, so that "keep the first" keeps the clean one.
            row = dict(base)
            first = next(i for i, r in enumerate(out) if r is base)
            position = int(rng.integers(first + 1, len(out) + 1))
        else:
            row = broken(kind, base, _unshown_item(base["query"], shown_by_query, items, rng), rng)
            position = int(rng.integers(len(out) + 1))
        out.insert(position, row)
        made.append((row, kind))
    where = {id(row): i for i, row in enumerate(out)}
    faults = sorted(({"table": table, "index": where[id(row)], "kind": kind} for row, kind in made),
                    key=lambda fault: fault["index"])
    return out, faults


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


class SpecError(ValueError):
    """A shop that cannot be generated from these settings (the config's `default_data`)."""

    def __str__(self) -> str:
        return f"default_data: {super().__str__()}"


def check_spec(spec: ShopSpec) -> None:
    """Raises SpecError naming the setting a shop of `spec` cannot be generated with."""
    if spec.seed < 0:
        raise SpecError("seed must be 0 or more")
    if spec.num_items < 200:
        raise SpecError("num_items must be at least 200 (the shop needs its look-alike assortment)")
    if not 1 <= spec.results_per_query <= spec.num_items:
        raise SpecError("results_per_query must be between 1 and num_items")
    if spec.num_queries < 10:
        raise SpecError("num_queries must be at least 10")
    if not 0.0 <= spec.judged_query_fraction <= 1.0:
        raise SpecError("judged_query_fraction must be in [0, 1]")
    if not 0.0 <= spec.fault_rate < 0.5:
        raise SpecError("fault_rate must be in [0, 0.5)")


def generate_tables(spec: ShopSpec = ShopSpec()) -> ShopData:
    """Generates the shop in memory. Same spec, same tables."""
    check_spec(spec)
    # Independent streams per stage: changing how one stage draws leaves the others unchanged.
    rng_items, rng_queries, rng_logs, rng_judge, rng_log_faults, rng_judge_faults = (
        np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(6))
    items, appeal = _build_catalogue(spec, rng_items)
    queries = _build_queries(spec, items, rng_queries)
    logs, truth, relevance = _simulate_pairs(queries, items, appeal, spec, rng_logs)
    judgments = _simulate_judgments(queries, logs, relevance, spec, rng_judge)
    logs, log_faults = _inject_faults(logs, "logs", LOG_FAULT_KINDS, "duplicate_pair", spec, items,
                                      rng_log_faults)
    judgments, judgment_faults = _inject_faults(judgments, "judgments", JUDGMENT_FAULT_KINDS, "duplicate_key",
                                                spec, items, rng_judge_faults)
    catalogue = [{"item_id": it.item_id, "title": it.title, "category": it.category, "brand": it.brand,
                  "attributes": dict(it.attrs)} for it in items]
    return ShopData(logs=logs, judgments=judgments, truth=truth, catalogue=catalogue,
                    faults=log_faults + judgment_faults)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"  # 2.0 -> "2", 2.67 -> "2.67", like the Home Depot file
    return str(value)


def _write_csv(path: str, columns: Tuple[str, ...], rows: List[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row[c]) for c in columns])


def write(output_dir: str, spec: ShopSpec = ShopSpec(), write_truth: bool = False) -> dict:
    """Writes logs.csv and judgments.csv (and truth.csv) into output_dir; returns their paths."""
    data = generate_tables(spec)
    os.makedirs(output_dir, exist_ok=True)
    paths = {"logs": os.path.join(output_dir, "logs.csv"),
             "judgments": os.path.join(output_dir, "judgments.csv")}
    _write_csv(paths["logs"], LOG_COLUMNS, data.logs)
    _write_csv(paths["judgments"], JUDGMENT_COLUMNS, data.judgments)
    if write_truth:
        paths["truth"] = os.path.join(output_dir, "truth.csv")
        _write_csv(paths["truth"], TRUTH_COLUMNS, data.truth)
    return paths
