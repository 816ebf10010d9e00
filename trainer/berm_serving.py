"""BERM-O: the student as a self-contained SavedModel that scores raw (query, item) pairs.

A trained student (`trainer.student.build_student`) needs each pair's graph
context. At serving time only `query`, `item_id` and `item_title` arrive, so
BERM-O carries the graph inside the model:

  * `read_neighbour_tables(dir)` reads the GraphContexts `neighbour_tables`
    output: gzipped TFRecords of tf.Example, one per (side, node, metapath),
    with `side`, `node_id`, `metapath`, `order`, `neighbour_ids`,
    `neighbour_texts`, `neighbour_weights`
    (`components.graph.metapaths.neighbour_record_to_tf_example`).
  * `NeighbourTables` turns them into lookup tables: per side the node ids'
    64-bit fingerprints, sorted, and each one's row (a binary search finds a
    request's ids; unknown -> row 0, which is empty); per (side, order) int32
    [rows, C] indices into a table of distinct neighbour texts (0 = padding)
    and float32 [rows, C] path weights; and the distinct texts already
    encoded at export time by the trained model's own
    `context_wordpiece`, embedding and pooling (float32 [texts, D] vectors,
    as training computes them). So serving gathers 4 x C vectors per pair
    instead of tokenising and embedding 4 x C texts, and hands them to the
    nested vector scorer (`student.build_vector_scorer`). All of it is
    non-trainable variables of the SavedModel, none of it in the graph: the
    tables are versioned with the model.
  * `build_serving_model(scorer, neighbour_tables_dir)` -> `BermServing`, a
    tf.Module with the two signatures; `export_serving_model` writes it and
    `assets.extra/berm_manifest.json` (table sizes, max_order, the source
    files' sha256, a fingerprint of the tables).
  * The export is a Keras SavedModel of the string scorer (the tables and
    signatures hang off it), so `load_scorer(dir)` gives the trained Keras
    scorer back: a later component can rebuild BERM-O with newer tables
    without retraining (`export_serving_model(load_scorer(d), out, tables)`).

Signatures (both return `{"score": tf.float32 [None]}`, sigmoid of the logit):
  * `serving_default`: `examples` tf.string [None], serialized tf.Example with
    `query`, `item_title` and the `q_o{k}_*`/`i_o{k}_*` context features
    (missing ones are empty): the contexts come from the example.
  * `serve_raw`: `query`, `item_id`, `item_title` tf.string [None]. The query
    and the item id (whitespace-stripped, otherwise exact) are looked up in the
    tables; an unknown one has no neighbours, and a pair with neither takes the
    cold-start (0-order) path. For a pair whose example carries the tables'
    contexts both signatures give the same score.

A student with the title-vector path (`student.init_title_vector_path`) carries its
title -> sentence vector table in its own weights (`berm_layers.TitleVectorTable`), so both
signatures look the title up by its text; a title outside the table takes the path's fallback.

Graph ids are the raw logged strings (see `metapaths.normalise_log_row`), so
the lookup is exact: "Red Drill" and "red drill" are different queries.
Size: 16 bytes per node for its key and row, 8 * C bytes per (node, order) for
its neighbours and weights, 8 * (C + 1) more at order 1 for the neighbours' id
fingerprints (BERM-O drops the pair itself by them), and 4 * D bytes per distinct
text; the graph's size does not grow with the tables. Two ids sharing a
fingerprint (odds about n^2 / 2^64) would share a row, so the export refuses them.
Like the teacher's, the graph uses tensorflow_text ops (FastBertNormalize,
FastWordpieceTokenizeWithOffsets, NormalizeUTF8): the model server needs them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import logging
import numpy as np
import pandas as pd
import tensorflow as tf

from trainer import berm_layers
from trainer import student

MANIFEST_FILE = "berm_manifest.json"
FORMAT_VERSION = 1
SIDES = ("query", "item")
_LETTERS = {"query": "q", "item": "i"}
_READ_BATCH = 1024
_ENCODE_BATCH = 4096

_TABLE_SPEC = {
    "side": tf.io.FixedLenFeature([], tf.string),
    "node_id": tf.io.FixedLenFeature([], tf.string),
    "metapath": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "order": tf.io.FixedLenFeature([], tf.int64),
    "neighbour_ids": tf.io.RaggedFeature(tf.string),
    "neighbour_texts": tf.io.RaggedFeature(tf.string),
    "neighbour_weights": tf.io.RaggedFeature(tf.float32),
}


def metapath_name(side: str, order: int) -> str:
    """("query", 2) -> "q-i-q" (as components.graph.metapaths names them)."""
    letters, other = [_LETTERS[side]], {"q": "i", "i": "q"}
    for _ in range(order):
        letters.append(other[letters[-1]])
    return "-".join(letters)


# --- Reading the graph component's tables ---------------------------------------------

@dataclasses.dataclass
class NeighbourTablesData:
    """Neighbour tables in arrays (row 0 and text 0 are padding).

    Attributes:
      max_order, max_context_texts: what the arrays cover (C = max_context_texts).
      keys: per side, the node ids; node keys[side][r] has row r + 1.
      neighbours: per "{side}_o{k}", int32 [len(keys[side]) + 1, C]: 1 + the index
        in `texts` of each neighbour, 0 for padding; rows are left-aligned, in the
        graph's order (weight descending).
      weights: per "{side}_o{k}", float32 [len(keys[side]) + 1, C], 0 padding.
      neighbour_ids: per "{side}_o1", object (bytes) [len(keys[side]) + 1, C]: the
        neighbour's node id, b"" for padding; the lookup drops the pair itself with it.
      texts: the distinct neighbour texts.
      records: records read per "{side}_o{k}" (orders above max_order are skipped).
      source_files: [{"name", "bytes", "sha256"}] of the files read.
    """

    max_order: int
    max_context_texts: int
    keys: Dict[str, List[str]]
    neighbours: Dict[str, np.ndarray]
    weights: Dict[str, np.ndarray]
    texts: List[str]
    records: Dict[str, int]
    source_files: List[Dict[str, Any]]
    neighbour_ids: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @classmethod
    def empty(cls, max_order: int, max_context_texts: int) -> "NeighbourTablesData":
        width = max(max_context_texts, 1)
        names = [f"{side}_o{k}" for side in SIDES for k in range(1, max_order + 1)]
        return cls(max_order, max_context_texts, {side: [] for side in SIDES},
                   {n: np.zeros([1, width], np.int32) for n in names},
                   {n: np.zeros([1, width], np.float32) for n in names}, [],
                   {n: 0 for n in names}, [],
                   {n: np.full([1, width], b"", dtype=object) for n in names if n.endswith("_o1")})

    def fingerprint(self) -> str:
        """sha256 of the table contents (keys, neighbours, weights, texts)."""
        digest = hashlib.sha256()
        digest.update(json.dumps([self.max_order, self.max_context_texts, self.keys,
                                  self.texts]).encode("utf-8"))
        for name in sorted(self.neighbours):
            digest.update(name.encode("utf-8"))
            digest.update(np.ascontiguousarray(self.neighbours[name]).tobytes())
            digest.update(np.ascontiguousarray(self.weights[name]).tobytes())
        for name in sorted(self.neighbour_ids):
            digest.update(b"\0".join(self.neighbour_ids[name].reshape(-1).tolist()))
        return digest.hexdigest()

    def summary(self) -> Dict[str, Any]:
        return {
            "max_order": self.max_order,
            "max_context_texts": self.max_context_texts,
            "nodes": {side: len(self.keys[side]) for side in SIDES},
            "records": dict(self.records),
            "distinct_neighbour_texts": len(self.texts),
            "fingerprint": self.fingerprint(),
            "source_files": list(self.source_files),
        }


def _table_files(directory: str) -> List[str]:
    files = sorted(f for f in tf.io.gfile.glob(os.path.join(directory, "*"))
                   if not tf.io.gfile.isdir(f) and not f.endswith(".json"))
    if not files:
        raise FileNotFoundError(f"no neighbour table files in {directory}")
    return files


def _file_info(path: str) -> Dict[str, Any]:
    digest, size = hashlib.sha256(), 0
    with tf.io.gfile.GFile(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
    return {"name": os.path.basename(path), "bytes": size, "sha256": digest.hexdigest()}


def read_neighbour_tables(directory: str, max_order: int, max_context_texts: int
                          ) -> NeighbourTablesData:
    """Reads a GraphContexts `neighbour_tables` folder (every non-JSON file in it).

    Lists longer than `max_context_texts` keep their first entries (the graph
    sorts by weight); orders above `max_order` are skipped.

    Raises:
      FileNotFoundError: no table files.
      ValueError: an unknown side, an order outside 1..3, a metapath that does
        not match side and order, or the same (side, node, order) twice.
    """
    files = _table_files(directory)
    names = [f"{side}_o{k}" for side in SIDES for k in range(1, max_order + 1)]
    # Column by column in numpy, not record by record in Python: a log of millions of nodes
    # has tens of millions of neighbour entries, and per-entry Python objects cost minutes and
    # gigabytes at that size.
    chunks: Dict[str, List[_TableChunk]] = {name: [] for name in names}
    texts: Dict[str, List[tf.Tensor]] = {name: [] for name in names}  # each chunk's kept texts
    for file_index, path in enumerate(files):
        dataset = tf.data.TFRecordDataset(path, compression_type="GZIP" if path.endswith(".gz") else "")
        for batch in dataset.batch(_READ_BATCH).map(lambda s: tf.io.parse_example(s, _TABLE_SPEC)):
            columns = {key: batch[key].numpy() for key in ("side", "node_id", "metapath", "order")}
            _check_records(path, columns)
            # Strings stay in tensors (no Python object per string) until they are made distinct.
            lists = {key: (batch[key].flat_values, batch[key].row_splits.numpy())
                     for key in ("neighbour_texts", "neighbour_weights", "neighbour_ids")}
            for side in SIDES:
                for order in range(1, max_order + 1):
                    rows = np.flatnonzero((columns["side"] == side.encode()) & (columns["order"] == order))
                    if rows.size:
                        chunk, kept_texts = _TableChunk.take(batch["node_id"], lists, rows, order,
                                                             max_context_texts, file_index)
                        chunks[f"{side}_o{order}"].append(chunk)
                        texts[f"{side}_o{order}"].append(kept_texts)
    data = NeighbourTablesData.empty(max_order, max_context_texts)
    data.records = {name: sum(len(c.keep) for c in chunks[name]) for name in names}
    data.source_files = [_file_info(f) for f in files]
    merged = {name: _TableChunk.concat(chunks.pop(name)) for name in names if chunks[name]}
    node_rows = {}  # per (side, order) present, each record's row
    for side in SIDES:
        present = [name for name in names if name.startswith(f"{side}_") and name in merged]
        nodes, node_index = _first_appearance([merged[name].nodes for name in present])
        keys = [node.decode("utf-8") for node in nodes]
        for name, index in zip(present, node_index):
            _check_unique_nodes(name, index, keys, merged[name].file_index, files)
        by_key = sorted(range(len(keys)), key=keys.__getitem__)
        data.keys[side] = [keys[i] for i in by_key]
        row_of_node = np.empty(len(keys), np.int64)
        row_of_node[by_key] = np.arange(1, len(keys) + 1)
        node_rows.update((name, row_of_node[index]) for name, index in zip(present, node_index))
    # A text's index is the order of its first appearance, side by side, order by order, in the
    # order the records were read, as the tables have always numbered them (the fingerprint).
    distinct, text_index = _first_appearance([part for name in merged for part in texts.pop(name)])
    data.texts = [text.decode("utf-8") for text in distinct]
    text_ids = dict(zip(merged, np.split(np.concatenate(text_index or [[]]).astype(np.int32) + 1,
                                         np.cumsum([len(c.positions) for c in merged.values()])[:-1])))
    for name in names:
        first_order = name.endswith("_o1")
        width = data.neighbours[name].shape[1] + (1 if first_order else 0)
        neighbours = np.zeros([len(data.keys[name.split("_o")[0]]) + 1, width], np.int32)
        weights = np.zeros(neighbours.shape, np.float32)
        if name in merged:
            chunk = merged[name]
            entry_rows = np.repeat(node_rows[name], chunk.keep)
            neighbours[entry_rows, chunk.positions] = text_ids[name]
            weights[entry_rows, chunk.positions] = chunk.weights
        data.neighbours[name], data.weights[name] = neighbours, weights
        if first_order:
            ids = np.full(neighbours.shape, b"", dtype=object)
            if name in merged:
                # One bytes object per distinct id, however many rows name it.
                distinct_ids, [id_index] = _first_appearance([chunk.ids])
                ids[entry_rows, chunk.positions] = np.array(distinct_ids, dtype=object)[id_index]
            data.neighbour_ids[name] = ids
    for name, count in data.records.items():
        if not count:
            logging.warning("BERM-O: no %s records in %s; that context is always empty", name,
                            directory)
    return data


@dataclasses.dataclass
class _TableChunk:
    """Records of one (side, order), columns in read order: each node's kept entries, flat."""

    nodes: tf.Tensor  # tf.string [records]
    keep: np.ndarray  # int [records]: entries kept per record
    positions: np.ndarray  # int [entries]: each entry's place in its record's list
    weights: np.ndarray  # float32 [entries]
    ids: tf.Tensor  # tf.string [entries] at order 1, [0] above
    file_index: np.ndarray  # int [records]: which file each record came from

    _STRINGS = ("nodes", "ids")

    @classmethod
    def take(cls, nodes: tf.Tensor, lists: Mapping[str, Tuple[tf.Tensor, np.ndarray]],
             rows: np.ndarray, order: int, max_context_texts: int, file_index: int
             ) -> Tuple["_TableChunk", tf.Tensor]:
        """`rows` of a parsed batch (`nodes` its node ids, `lists` each neighbour list's flat
        values and row splits), and their kept texts, which are numbered apart."""
        lengths = {key: np.diff(splits)[rows] for key, (_, splits) in lists.items()}
        texts_and_weights = np.minimum(lengths["neighbour_texts"], lengths["neighbour_weights"])
        # Order-1 rows keep one entry more than served: dropping the pair itself at lookup
        # then leaves the same neighbours the training examples got.
        keep = np.minimum(np.minimum(texts_and_weights, lengths["neighbour_ids"]), max_context_texts + 1)
        if order > 1:
            keep = np.minimum(keep, max_context_texts)
        record_start = np.cumsum(keep) - keep
        positions = np.arange(int(keep.sum())) - np.repeat(record_start, keep)
        # Only order 1 serves the neighbours' ids (BERM-O drops the pair itself by them).
        wanted = [key for key in lists if order == 1 or key != "neighbour_ids"]
        taken = {key: tf.gather(lists[key][0], np.repeat(lists[key][1][:-1][rows], keep) + positions)
                 for key in wanted}
        ids = taken.get("neighbour_ids", tf.constant([], tf.string))
        return cls(tf.gather(nodes, rows), keep, positions, taken["neighbour_weights"].numpy(), ids,
                   np.full(len(rows), file_index)), taken["neighbour_texts"]

    @classmethod
    def concat(cls, chunks: Sequence["_TableChunk"]) -> "_TableChunk":
        def join(parts, strings):
            return tf.concat(parts, axis=0) if strings else np.concatenate(parts)

        return cls(*(join([getattr(c, f.name) for c in chunks], f.name in cls._STRINGS)
                     for f in dataclasses.fields(cls)))


def _first_appearance(parts: Sequence[tf.Tensor]) -> Tuple[List[bytes], List[np.ndarray]]:
    """The distinct strings of `parts` in the order they first appear, and each part's strings'
    indices into them."""
    if not parts:
        return [], []
    # tf.unique hashes strings one by one (about 0.7 us each) and needs them in one tensor;
    # pandas numbers their 64-bit fingerprints by first appearance in a fraction of that, and
    # the parts are never copied into one. Every string is then compared with the one standing
    # for its fingerprint, so a collision cannot merge two texts: it falls back to tf.unique.
    fingerprints = np.concatenate([tf.strings.to_hash_bucket_fast(part, np.iinfo(np.int64).max).numpy()
                                   for part in parts])
    index, _ = pd.factorize(fingerprints)
    seen = np.maximum.accumulate(index)
    first = np.flatnonzero(np.diff(seen, prepend=-1) > 0)  # where each number first appears
    bounds = np.cumsum([0] + [len(part) for part in parts])
    firsts = np.split(first, np.searchsorted(first, bounds[1:-1]))
    distinct = tf.concat([tf.gather(part, at - start) for part, at, start in zip(parts, firsts, bounds)],
                         axis=0)
    indices = np.split(index, bounds[1:-1])
    if not all(bool(tf.reduce_all(tf.gather(distinct, at) == part)) for part, at in zip(parts, indices)):
        distinct, index = tf.unique(tf.concat(parts, axis=0))
        indices = np.split(index.numpy(), bounds[1:-1])
    return distinct.numpy().tolist(), indices


def _check_records(path: str, columns: Mapping[str, np.ndarray]) -> None:
    """Raises on the first record with an unknown side, an order outside 1..3, or a metapath
    (when given) that is not its side's and order's."""
    side, order, metapath = columns["side"], columns["order"], columns["metapath"]
    known_side = np.isin(side, [s.encode() for s in SIDES])
    known_order = (order >= 1) & (order <= 3)
    matching = metapath == b""
    for s in SIDES:
        for k in range(1, 4):
            matching |= (side == s.encode()) & (order == k) & (metapath == metapath_name(s, k).encode())
    bad = np.flatnonzero(~(known_side & known_order & matching))
    if not bad.size:
        return
    i = bad[0]
    node = columns["node_id"][i].decode("utf-8")
    if not known_side[i]:
        raise ValueError(f"{path}: unknown side {side[i].decode()!r} for node {node!r}")
    if not known_order[i]:
        raise ValueError(f"{path}: order {int(order[i])} outside 1..3 for {side[i].decode()} {node!r}")
    raise ValueError(f"{path}: metapath {metapath[i].decode()!r} does not match side {side[i].decode()} "
                     f"and order {int(order[i])}")


def _check_unique_nodes(name: str, index: np.ndarray, keys: Sequence[str], file_index: np.ndarray,
                        files: Sequence[str]) -> None:
    """Raises if a node has two records of one (side, order) (`index`: each record's node in
    `keys`, in read order), naming the file of the earliest second record."""
    by_node = np.argsort(index, kind="stable")
    repeats = by_node[1:][index[by_node[1:]] == index[by_node[:-1]]]
    if repeats.size:
        i = repeats.min()
        side, order = name.split("_o")
        raise ValueError(f"{files[file_index[i]]}: {side} node {keys[index[i]]!r} has two order-{order} records")


# --- In-model tables ------------------------------------------------------------------

def encode_texts(scorer: tf.keras.Model, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """Neighbour texts -> float32 [len(texts) + 1, D] vectors and bool [len(texts) + 1] `present`.

    Row 0 is padding; row i + 1 is texts[i] through the scorer's own
    `context_wordpiece`, embedding and pooling (`student.encode_neighbour_texts`).
    """
    token_scorer = scorer.get_layer(student.TOKEN_SCORER)
    dim = token_scorer.get_layer(student.EMBEDDING_LAYER).embedding_dim
    vectors, present = [np.zeros([1, dim], np.float32)], [np.zeros([1], bool)]
    tokenizer = scorer.get_layer(student.CONTEXT_WORDPIECE) if texts else None
    for start in range(0, len(texts), _ENCODE_BATCH):
        tokens = tokenizer(tf.constant(texts[start:start + _ENCODE_BATCH]))
        batch_vectors, batch_present = student.encode_neighbour_texts(token_scorer, tokens)
        vectors.append(batch_vectors.numpy())
        present.append(batch_present.numpy())
    return np.concatenate(vectors), np.concatenate(present)


class NeighbourTables(tf.Module):
    """The neighbour tables inside the model: node ids -> context vectors for the vector scorer."""

    def __init__(self, data: NeighbourTablesData, scorer: tf.keras.Model, name: str = "berm_tables"):
        super().__init__(name=name)
        self.max_order = data.max_order
        # Node ids are 64-bit fingerprints in sorted weights, searched per request, as the title
        # table's are: a hash table's keys would be constants in the model's graph, which a
        # GraphDef's 2 GB caps, and each would be a string in every replica's memory.
        self.node_fingerprints, self.node_rows = {}, {}
        for side in SIDES:
            keys, order = berm_layers.sorted_fingerprints(data.keys[side], f"BERM-O's {side} ids")
            # Key i of data.keys[side] has row i + 1; the search's last place holds no node.
            self.node_fingerprints[side] = tf.Variable(np.append(keys, berm_layers.NO_FINGERPRINT),
                                                       trainable=False, name=f"{side}_fingerprints")
            self.node_rows[side] = tf.Variable(np.append(order + 1, 0), trainable=False,
                                               name=f"{side}_rows")
        self.neighbours = {n: tf.Variable(a, trainable=False, name=f"{n}_neighbours")
                           for n, a in data.neighbours.items()}
        self.weights = {n: tf.Variable(a, trainable=False, name=f"{n}_weights")
                        for n, a in data.weights.items()}
        self.neighbour_fingerprints = {
            n: tf.Variable(berm_layers.fingerprint_array(a.reshape(-1)).reshape(a.shape),
                           trainable=False, name=f"{n}_id_fingerprints")
            for n, a in data.neighbour_ids.items()}
        self.max_context_texts = data.max_context_texts
        # Each distinct neighbour text is embedded once here, with the trained weights, rather
        # than tokenised and embedded again in every request that reaches it: BERM-O's per-pair
        # context work is then a gather of 4 x C vectors (README, student benchmark).
        vectors, present = encode_texts(scorer, data.texts)
        self.text_vectors = tf.Variable(vectors, trainable=False, name="text_vectors")
        self.text_present = tf.Variable(present, trainable=False, name="text_present")

    def lookup(self, query: tf.Tensor, item_id: tf.Tensor) -> Dict[str, tf.Tensor]:
        """Context inputs of the vector scorer (`{prefix}_vectors/_present/_weights/_length`)."""
        ids = {"query": berm_layers.text_fingerprints(query),
               "item": berm_layers.text_fingerprints(item_id)}
        rows = {}
        for side in SIDES:
            position, known = berm_layers.search_fingerprints(self.node_fingerprints[side], ids[side])
            rows[side] = tf.where(known, tf.gather(self.node_rows[side], position), 0)
        features = {}
        for prefix in student.context_prefixes(self.max_order):
            side, order = student.prefix_side_and_order(prefix)
            name = f"{side}_o{order}"
            indices = tf.gather(self.neighbours[name], rows[side])  # [N, C] (C + 1 for order 1)
            weights = tf.gather(self.weights[name], rows[side])
            if name in self.neighbour_fingerprints:
                # As in training (metapaths.JoinContexts): the pair is not its own context.
                other = ids["item" if side == "query" else "query"]
                own = tf.equal(tf.gather(self.neighbour_fingerprints[name], rows[side]),
                               other[:, tf.newaxis])
                keep = tf.logical_and(indices > 0, tf.logical_not(own))
                order_kept = tf.argsort(tf.cast(tf.logical_not(keep), tf.int32), axis=1, stable=True)
                keep = tf.gather(keep, order_kept, batch_dims=1)
                indices = tf.where(keep, tf.gather(indices, order_kept, batch_dims=1), 0)
                weights = tf.where(keep, tf.gather(weights, order_kept, batch_dims=1), 0.0)
                indices = indices[:, :self.max_context_texts]
                weights = weights[:, :self.max_context_texts]
            features[f"{prefix}_vectors"] = tf.gather(self.text_vectors, indices)  # [N, C, D]
            features[f"{prefix}_present"] = tf.gather(self.text_present, indices)
            features[f"{prefix}_weights"] = weights
            features[f"{prefix}_length"] = tf.reduce_sum(tf.cast(indices > 0, tf.int32), axis=1)
        return features


class TokenVectors(tf.Module):
    """The student's token embedding evaluated once for the whole vocabulary, at export.

    With the teacher's embeddings the student projects 384-wide frozen rows to its own width;
    training needs that projection, serving does not: a request gathers rows of this
    [vocab_size, D] table instead of gathering and projecting the batch's distinct tokens.
    Called like `berm_layers.TokenEmbedding`; the pretrained means of the title-vector path
    still come from the layer itself.
    """

    def __init__(self, embedding: tf.keras.layers.Layer, name: str = "token_vectors"):
        super().__init__(name=name)
        self._embedding = embedding
        size = embedding.vocab_size
        rows = [embedding(tf.range(start, min(start + _ENCODE_BATCH, size))[tf.newaxis])[0]
                for start in range(0, size, _ENCODE_BATCH)]
        self.table = tf.Variable(tf.concat(rows, axis=0), trainable=False, name="table")

    def __call__(self, ids: tf.Tensor, pretrained_mean: bool = False,
                 skip_rows: Optional[tf.Tensor] = None) -> tf.Tensor:
        if pretrained_mean:
            return self._embedding(ids, pretrained_mean=True, skip_rows=skip_rows)
        return tf.gather(self.table, tf.cast(ids, tf.int32))


class BermServing(tf.Module):
    """The student with its neighbour tables; `signatures` are what gets exported."""

    def __init__(self, scorer: tf.keras.Model, tables: NeighbourTables, manifest: Mapping[str, Any]):
        super().__init__(name="berm_serving")
        self.scorer = scorer
        self.tables = tables
        self.token_vectors = TokenVectors(
            scorer.get_layer(student.TOKEN_SCORER).get_layer(student.EMBEDDING_LAYER))
        # A JSON string: a dict attribute would become a tracked (and unserialisable) wrapper.
        self._manifest_json = json.dumps(dict(manifest), sort_keys=True)
        settings = student.scorer_settings(scorer)
        self._max_order = settings["max_order"]
        self._max_context_texts = settings["max_context_texts"]
        self._spec = student.serving_feature_spec(self._max_order)
        self.serve_examples = tf.function(
            self._serve_examples,
            input_signature=[tf.TensorSpec([None], tf.string, name=student.EXAMPLES_KEY)])
        self.serve_raw = tf.function(
            self._serve_raw,
            input_signature=[tf.TensorSpec([None], tf.string, name=student.QUERY_KEY),
                             tf.TensorSpec([None], tf.string, name=student.ITEM_ID_KEY),
                             tf.TensorSpec([None], tf.string, name=student.TITLE_KEY)])

    def _serve_examples(self, examples):
        parsed = tf.io.parse_example(examples, self._spec)
        features = student.string_features(parsed, self._max_order, self._max_context_texts)
        return {student.SCORE_KEY: tf.sigmoid(self.scorer(features, training=False))}

    def _serve_raw(self, query, item_id, item_title):
        token_scorer = self.scorer.get_layer(student.TOKEN_SCORER)
        features = self.tables.lookup(query, item_id)
        table = student.title_vector_table(self.scorer)
        # A request usually scores many items of few queries: tokenise each distinct query once.
        queries, query_row = tf.unique(query)
        query_tokens = tf.gather(self.scorer.get_layer(student.QUERY_WORDPIECE)(queries), query_row)
        title_vectors = None if table is None else table(item_title)
        title_tokens, title_trigrams = student.title_tokens_and_trigrams(
            self.scorer, item_title, None if title_vectors is None else title_vectors[1])
        features.update(student.centre_vectors(
            token_scorer, query_tokens, title_tokens, title_vectors, embed=self.token_vectors,
            title_trigrams=title_trigrams))
        logit = token_scorer.get_layer(student.VECTOR_SCORER)(features, training=False)
        return {student.SCORE_KEY: tf.sigmoid(logit)}

    @property
    def manifest(self) -> Dict[str, Any]:
        return json.loads(self._manifest_json)

    @property
    def signatures(self) -> Dict[str, Any]:
        return {tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY:
                    self.serve_examples.get_concrete_function(),
                student.RAW_SIGNATURE: self.serve_raw.get_concrete_function()}


def build_serving_model(scorer: tf.keras.Model, neighbour_tables_dir: Optional[str] = None,
                        extra_manifest: Optional[Mapping[str, Any]] = None) -> BermServing:
    """BERM-O from a trained string scorer and the graph component's neighbour tables.

    Args:
      scorer: a `student.build_student` model (trained in this process, or
        re-loaded with `load_scorer` from an earlier export).
      neighbour_tables_dir: GraphContexts `neighbour_tables` folder; None gives
        empty tables (serve_raw then always takes the 0-order path).
      extra_manifest: more JSON-serialisable entries for the manifest.
    """
    settings = student.scorer_settings(scorer)
    if neighbour_tables_dir is None or settings["max_order"] == 0:
        data = NeighbourTablesData.empty(settings["max_order"], settings["max_context_texts"])
        if neighbour_tables_dir is None and settings["max_order"] > 0:
            logging.warning("BERM-O: no neighbour_tables_dir: serve_raw scores every pair "
                            "with the 0-order (cold-start) path")
    else:
        data = read_neighbour_tables(neighbour_tables_dir, settings["max_order"],
                                     settings["max_context_texts"])
    tables = NeighbourTables(data, scorer)
    embedding = scorer.get_layer(student.TOKEN_SCORER).get_layer(student.EMBEDDING_LAYER)
    title_table = student.title_vector_table(scorer)
    # How the frozen tables are stored (read as float32 either way), for whoever sizes a model
    # without loading it; a re-loaded scorer has no StudentConfig to tell.
    frozen = {}
    if embedding.pretrained_dim is not None:
        frozen["pretrained_token_embeddings"] = embedding.table_dtype
    if title_table is not None:
        frozen["title_vectors"] = title_table.table_dtype
    manifest = {
        "format_version": FORMAT_VERSION,
        "signatures": {"serving_default": ["examples"],
                       student.RAW_SIGNATURE: [student.QUERY_KEY, student.ITEM_ID_KEY,
                                               student.TITLE_KEY]},
        "max_order": settings["max_order"],
        "max_context_texts": settings["max_context_texts"],
        "neighbour_tables_dir": neighbour_tables_dir,
        "tables": data.summary(),
        "text_vectors_shape": list(tables.text_vectors.shape),
        "token_vectors_shape": [embedding.vocab_size, embedding.embedding_dim],
        "title_vectors": settings["title_vectors"],
        "frozen_table_dtypes": frozen,
    }
    manifest.update(extra_manifest or {})
    return BermServing(scorer, tables, manifest)


def export_serving_model(scorer: tf.keras.Model, serving_model_dir: str,
                         neighbour_tables_dir: Optional[str] = None,
                         extra_manifest: Optional[Mapping[str, Any]] = None) -> BermServing:
    """Builds BERM-O and writes it (SavedModel + assets.extra/berm_manifest.json)."""
    serving = build_serving_model(scorer, neighbour_tables_dir, extra_manifest)
    save_serving_model(serving, serving_model_dir)
    return serving


def save_serving_model(serving: BermServing, serving_model_dir: str) -> None:
    """Writes `serving` as a Keras SavedModel of its scorer with the BERM-O signatures.

    The scorer is the root (so `load_scorer` can re-load it as a Keras model);
    the tables are saved with it through its `berm_serving` attribute.
    """
    scorer = serving.scorer
    scorer.berm_serving = serving  # Tracks the tables from the root.
    # save_traces=False: every layer is rebuilt from its config on re-load, and
    # saving skips tracing each layer's call (half the export time).
    scorer.save(serving_model_dir, save_format="tf", include_optimizer=False,
                signatures=serving.signatures, save_traces=False)
    extra = os.path.join(serving_model_dir, "assets.extra")
    tf.io.gfile.makedirs(extra)
    with tf.io.gfile.GFile(os.path.join(extra, MANIFEST_FILE), "w") as f:
        json.dump(serving.manifest, f, indent=2, sort_keys=True)
    logging.info("BERM-O: exported to %s (tables %s)", serving_model_dir,
                 json.dumps(serving.manifest["tables"]["nodes"]))


def read_manifest(serving_model_dir: str) -> Dict[str, Any]:
    with tf.io.gfile.GFile(os.path.join(serving_model_dir, "assets.extra", MANIFEST_FILE)) as f:
        return json.load(f)


def load_scorer(serving_model_dir: str) -> tf.keras.Model:
    """The Keras string scorer of an exported student (for `build_serving_model`).

    A later component can thus rebuild BERM-O with newer neighbour tables:
    `export_serving_model(load_scorer(model_dir), out_dir, tables_dir)`.
    """
    return tf.keras.models.load_model(serving_model_dir, compile=False)
