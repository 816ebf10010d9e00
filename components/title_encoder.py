"""TitleEncoder: the pretrained sentence encoder's vectors of every logged item title.

The student's title-vector path (trainer/sentence_vectors.py, `berm_layers.SentenceMatch`)
stores one vector per item title, computed here once with the pretrained all-MiniLM-L6-v2
encoder, before the StudentTrainer, which learns to match queries against them. The titles are
those of every log split: like the graph, they are catalogue data the serving model will have
for any logged item, and no judgment is read. The queries of `query_split` (the student's train
split) are encoded too, only to fit the map that stands in for a query's vector. With
`min_impressions`, texts logged less often than that are left out (`graph.table_min_impressions`).

One Beam pipeline: read -> (text, kind) with its impressions summed -> those kept -> batches ->
encode (one encoder per worker, loaded in `setup`) -> gzipped TFRecords of tf.Example (`text`,
`kind`, `vector`).
"""
import os

import apache_beam as beam
from absl import logging
from tfx.dsl.component.experimental.annotations import (BeamComponentParameter, InputArtifact,
                                                        OutputArtifact, Parameter)
from tfx.dsl.component.experimental.decorators import component
from tfx.types import artifact_utils, standard_artifacts

from components import artifacts

VECTORS_PREFIX = "vectors"


def _texts(serialized: bytes, with_query: bool):
    """((text, kind), the row's impressions) for the row's title and, `with_query`, its query."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from trainer import sentence_vectors  # pylint: disable=g-import-not-at-top

    feature = tf.train.Example.FromString(serialized).features.feature
    counts = feature["impressions"].int64_list.value if "impressions" in feature else []
    impressions = int(counts[0]) if counts else 0
    title = feature["item_title"].bytes_list.value
    if title and title[0].decode("utf-8").strip():
        yield (title[0].decode("utf-8").strip(), sentence_vectors.TITLE), impressions
    query = feature["query"].bytes_list.value
    if with_query and query and query[0].decode("utf-8").strip():
        yield (query[0].decode("utf-8").strip(), sentence_vectors.QUERY), impressions


class _Encode(beam.DoFn):
    """Batches of (text, kind) -> serialized tf.Examples with the encoder's vectors."""

    def __init__(self, checkpoint_dir: str, max_seq_length: int):
        self._checkpoint_dir, self._max_seq_length = checkpoint_dir or None, max_seq_length
        self._encoder = None
        self._done = beam.metrics.Metrics.counter("TitleEncoder", "texts_encoded")

    def setup(self):
        from trainer import sentence_vectors  # pylint: disable=g-import-not-at-top

        self._encoder = sentence_vectors.SentenceEncoder(self._checkpoint_dir, self._max_seq_length)

    def process(self, batch):
        from trainer import sentence_vectors  # pylint: disable=g-import-not-at-top

        vectors = self._encoder.encode([text for text, _ in batch])
        self._done.inc(len(batch))
        for (text, kind), vector in zip(batch, vectors):
            yield sentence_vectors.to_tf_example(text, kind, vector).SerializeToString()


def encode_texts(pipeline: beam.Pipeline, examples: standard_artifacts.Examples, output_dir: str,
                 query_split: str = "train", checkpoint_dir: str = "",
                 max_seq_length: int = 40, batch_size: int = 256,
                 min_impressions: int = 0) -> None:
    """Adds the encoding of `examples`' titles (and `query_split`'s queries) to `pipeline`.

    With `min_impressions` > 0 only the texts logged with at least that many impressions in
    all (summed over their rows) are encoded: the title table is stored in BERM-O, and on a
    catalogue of millions of items its long tail would cost 1.5 kB per title in every serving
    replica. A title left out takes the title path's fallback, in training as in serving.
    """
    if min_impressions < 0:
        raise ValueError(f"TitleEncoder: min_impressions must be >= 0, got {min_impressions}")
    splits = artifact_utils.decode_split_names(examples.split_names)
    if query_split and query_split not in splits:
        raise ValueError(f"TitleEncoder: query_split {query_split!r} is not a split of the "
                         f"examples ({splits})")
    texts = []
    for split in splits:
        pattern = os.path.join(artifact_utils.get_split_uri([examples], split), "*")
        texts.append(pipeline
                     | f"Read[{split}]" >> beam.io.ReadFromTFRecord(pattern, coder=beam.coders.BytesCoder())
                     | f"Texts[{split}]" >> beam.FlatMap(_texts, split == query_split))
    _ = (texts
         | "AllTexts" >> beam.Flatten()
         | "SumImpressions" >> beam.CombinePerKey(sum)
         | "Busy" >> beam.Filter(lambda text_volume: text_volume[1] >= min_impressions)
         | "DistinctTexts" >> beam.Keys()
         | "Batch" >> beam.BatchElements(min_batch_size=batch_size, max_batch_size=batch_size)
         | "Encode" >> beam.ParDo(_Encode(checkpoint_dir, max_seq_length))
         | "Write" >> beam.io.WriteToTFRecord(os.path.join(output_dir, VECTORS_PREFIX),
                                             file_name_suffix=".gz"))


@component(use_beam=True)
def TitleEncoder(
    examples: InputArtifact[standard_artifacts.Examples],
    title_vectors: OutputArtifact[artifacts.TitleVectors],
    query_split: Parameter[str] = "train",
    checkpoint_dir: Parameter[str] = "",
    max_seq_length: Parameter[int] = 40,
    min_impressions: Parameter[int] = 0,
    beam_pipeline: BeamComponentParameter[beam.Pipeline] = None,
) -> None:
    with beam_pipeline as pipeline:
        encode_texts(pipeline, examples, title_vectors.uri, query_split, checkpoint_dir,
                     max_seq_length, min_impressions=min_impressions)
    logging.info("TitleEncoder: wrote title vectors to %s", title_vectors.uri)
