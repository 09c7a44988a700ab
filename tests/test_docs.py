"`show_doc` documents every parameter of the functions a user calls: each has a docment (an inline comment)."
import inspect

import pytest
from fastcore.docments import docments
from nbdev.showdoc import show_doc

from mil_nb.bags import data
from mil_nb.cloud import deploy, launch, local_processing, processing, shards
from mil_nb.core import distributed, files
from mil_nb.evaluate import evaluation, geojson
from mil_nb.models import encoders, features
from mil_nb.score import cohort, scorer
from mil_nb.serve import admission, inference, server
from mil_nb.slides import panda, tile_store, tiled_elsewhere, tiling
from mil_nb.train import training

PUBLIC = [training.fit, training.make_schedule, data.bag_loader, data.augment_tiles, data.jitter_hed_stains,
          data.dihedral_transform, tile_store.tile_slides, tiling.tile_slide, launch.launch, deploy.deploy,
          evaluation.predict, inference.predict, inference.predict_bag, cohort.predict_cohort, scorer.load_models,
          geojson.tile_geojson, processing.launch_processing, processing.launch_predict, processing.launch_tiling,
          shards.merge_scores, local_processing.run_predict_local, local_processing.run_tiling_local,
          tiled_elsewhere.merge_tile_stores, tiled_elsewhere.ready_tile_store, distributed.compress_gradients,
          encoders.encoder_from_name, encoders.load_encoder_weights, encoders.attach_tile_encoder,
          encoders.find_encoder_weights, features.extract_features, features.cached_features, features.encoder_mpp,
          features.bench_features, files.checked_file, files.read_json_object, files.npz_header,
          panda.check_table_ids, panda.read_result_table, shards.shard_meta, shards.read_shard,
          geojson.geojson_max_bytes, server.create_app, admission.spool_body, server.server_options,
          server.hypercorn_config, admission.Admission]


@pytest.mark.parametrize("function", PUBLIC, ids=lambda f: f"{f.__module__}.{f.__name__}")
def test_every_parameter_has_a_description(function):
    described = docments(function)
    missing = [name for name in inspect.signature(function).parameters if not described.get(name)]
    assert not missing, f"{function.__name__}: no docment for {missing}"
    shown = show_doc(function)._repr_markdown_()
    assert all(name in shown for name in inspect.signature(function).parameters)
