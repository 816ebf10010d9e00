"""BermServingExporter: the trained student plus the graph's neighbour tables -> BERM-O.

The Trainer cannot take the GraphContexts tables as an input, so the serving model is built
here: the student's scorer with the tables inside the SavedModel, so that TF Serving needs
only raw query, item id and title (trainer/berm_serving.py). Tables and model are versioned
together because they are one artifact.
"""
from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact
from tfx.dsl.component.experimental.decorators import component
from tfx.types import standard_artifacts
from tfx.utils import path_utils

from components import artifacts


@component
def BermServingExporter(
    model: InputArtifact[standard_artifacts.Model],
    neighbour_tables: InputArtifact[artifacts.NeighbourTables],
    serving_model: OutputArtifact[standard_artifacts.Model],
) -> None:
    from trainer import berm_serving  # TensorFlow Text ops load with it; only the executor needs them.

    scorer = berm_serving.load_scorer(path_utils.serving_model_path(model.uri))
    berm_serving.export_serving_model(
        scorer, path_utils.serving_model_dir(serving_model.uri), neighbour_tables.uri,
        extra_manifest={"student_model": model.uri, "neighbour_tables": neighbour_tables.uri})
    serving_model.set_string_custom_property("variant", "BERM-O")
