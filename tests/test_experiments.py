"""conf/experiment: every file composes with the paper's hyperparameters and points at a reference row (each row
trains on the real path in tests/test_real_path.py); rows extend the bases of conf/experiment/_base/ and state only
what differs; the loss/method selection contract of conf/loss and conf/method."""

from __future__ import annotations

import pytest

from dml_runner.config import conf_dir, group_options
from dml_runner.reference import load_reference, reference_tables, row_deviations

CONF = conf_dir()
EXPERIMENTS = group_options("experiment")  # the rows; bases (conf/experiment/_base/) are not options


def test_every_table_target_has_experiments():
    papers = [e for e in EXPERIMENTS if e.split("/")[0] in ("hdml", "lifted", "dc", "mdl")]
    assert len(papers) == 27 + 9 + 7 + 2 + 6  # dc: 7 rows and the author's CUB/Cars recipe (dc/author_recipe/)
    for prefix in ("hdml/table1_cub200/", "hdml/table2_cars196/", "hdml/table3_sop/"):
        rows = {e.split("/")[-1] for e in EXPERIMENTS if e.startswith(prefix)}
        assert rows == {"contrastive", "ddml", "lifted", "angular", "triplet", "triplet_hard", "hdml_triplet",
                        "npair", "hdml_npair"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_names_its_reference(compose_cfg, name):
    cfg = compose_cfg(f"+experiment={name}")
    ref = cfg.reference
    assert ref.paper and ref.table in reference_tables()
    assert row_deviations(ref), "every row states how it deviates from the paper"
    table = load_reference(ref.table)
    if ref.paper not in ("lifted", "mdl"):  # Lifted Struct rows are keyed by dataset and d; MDL has no numbers
        assert ref.row in set(table["row"]), f"{name}: row {ref.row} not in {ref.table}.csv"
    for group in ("dataset", "backbone", "loss", "sampler", "optimizer", "method"):
        assert cfg[group].get("_target_"), group
    assert cfg.trainer.epochs >= 1 and cfg.backbone.get("pretrained") is True


def test_every_trainable_reference_row_has_an_experiment():
    refs = set()
    for name in EXPERIMENTS:
        text = (CONF / "experiment" / f"{name}.yaml").read_text()
        table = text.split("  table: ")[1].split()[0]
        row = text.split("  row: ")[1].split()[0]
        refs.add((table, row))
    for table in reference_tables():
        frame = load_reference(table)
        for row in set(frame.loc[frame["trainable"], "row"]):
            assert (table, row) in refs, f"{table}/{row} has no conf/experiment file"


def test_paper_hyperparameters(compose_cfg):
    cub = compose_cfg("+experiment=hdml/table1_cub200/npair")
    assert cub.backbone.arch == "googlenet" and cub.backbone.embedding_dim == 512
    assert cub.transform.name == "caffe_227" and cub.sampler._target_.endswith("NPairBatchSampler")
    assert cub.optimizer.lr == pytest.approx(6e-5) and cub.loss.l2_reg == pytest.approx(1.5e-2)
    assert cub.trainer.batch_size == 128 and cub.trainer.epochs == 178  # 8004 steps, 45 an epoch (5864 // 128)
    assert not cub.scheduler.get("_target_")  # CUB: the official lr is never halved (batch_per_epoch 46)
    cars = compose_cfg("+experiment=hdml/table2_cars196/npair")
    assert cars.optimizer.lr == pytest.approx(7e-5) and cars.loss.l2_reg == pytest.approx(3e-3)
    lifted = compose_cfg("+experiment=lifted/lifted_cub200")
    assert lifted.optimizer._target_ == "torch.optim.SGD" and lifted.optimizer.lr == pytest.approx(1e-6)
    assert lifted.optimizer.momentum == 0.9 and lifted.optimizer.weight_decay == pytest.approx(2e-4)
    assert lifted.backbone.dropout == 0.4 and lifted.backbone.normalize is False
    assert lifted.trainer.head_lr_mult == 10 and lifted.loss.margin == 1.0
    assert compose_cfg("+experiment=lifted/lifted_sop").optimizer.lr == pytest.approx(1e-4)
    swept = compose_cfg("+experiment=lifted/lifted_cars196", "backbone.embedding_dim=64")
    assert swept.backbone.embedding_dim == 64  # the embedding size is an ordinary sweepable field
    mdl = compose_cfg("+experiment=mdl/mdl_cub200")
    assert mdl.loss._target_.endswith("MarginDiscriminateLoss") and "reconstructed" in mdl.reference.note


def test_hdml_and_divide_conquer_hyperparameters(compose_cfg):
    hdml = compose_cfg("+experiment=hdml/table2_cars196/hdml_npair")
    assert hdml.method._target_.endswith("HDMLMethod") and hdml.loss.beta == pytest.approx(1e4)
    assert hdml.loss.pulling_factor == 90 and hdml.loss.l2reg == pytest.approx(3e-3)
    assert compose_cfg("+experiment=hdml/table1_cub200/hdml_triplet").loss.pulling_factor == 7
    dc = compose_cfg("+experiment=dc/cub200")
    assert dc.method.num_clusters == 4 and dc.backbone.freeze == "bn" and dc.backbone.arch == "resnet50"
    assert dc.trainer.batch_size == 80 and dc.sampler.samples_per_class == 4 and dc.trainer.epochs == 200
    assert dc.optimizer.lr == pytest.approx(1e-5) and dc.transform.name == "rrc_224"
    assert compose_cfg("+experiment=dc/sop").method.num_clusters == 8
    vid = compose_cfg("+experiment=dc/vehicleid_small")
    assert vid.dataset.test_size == "small" and vid.dataset.protocol == "original"  # the paper table; loo = official code


# ------------------------------------------------------------------------------- bases (conf/experiment/_base)

BASES = sorted(str(p.relative_to(CONF / "experiment").with_suffix("")) for p in
               (CONF / "experiment" / "_base").rglob("*.yaml"))
OVERRIDE_PREFIX = "override /"


def _defaults(name: str) -> list:
    import yaml

    return yaml.safe_load((CONF / "experiment" / f"{name}.yaml").read_text()).get("defaults", [])


def _chain(name: str) -> set[str]:
    """The bases a row or base extends, transitively (names under conf/experiment)."""
    out: set[str] = set()
    for entry in _defaults(name):
        if isinstance(entry, str) and entry != "_self_":
            base = entry.removeprefix("/experiment/") if entry.startswith("/") else \
                str((CONF / "experiment" / name).parent.relative_to(CONF / "experiment") / entry)
            out |= {base} | _chain(base)
    return out


def test_every_row_extends_a_base_and_every_base_is_used():
    used: set[str] = set()
    for name in EXPERIMENTS:
        if name.split("/")[0] not in ("hdml", "lifted", "dc", "mdl"):
            continue
        first = _defaults(name)[0]
        assert isinstance(first, str) and first.startswith("/experiment/_base/"), f"{name}: first default {first}"
        used |= _chain(name)
    assert used == set(BASES), f"unused bases: {sorted(set(BASES) - used)}"
    for base in BASES:
        assert (CONF / "experiment" / f"{base}.yaml").read_text().startswith("# @package _global_\n"), base
        assert base not in EXPERIMENTS


def _base_values(name: str) -> dict[str, dict]:
    """{section: {key: value}} that the bases of ``name`` set in their own bodies (later bases win)."""
    import yaml

    out: dict[str, dict] = {}
    for entry in _defaults(name):
        if isinstance(entry, str) and entry != "_self_":
            base = entry.removeprefix("/experiment/")
            for section, values in _base_values(base).items():
                out.setdefault(section, {}).update(values)
            body = yaml.safe_load((CONF / "experiment" / f"{base}.yaml").read_text())
            for section, values in body.items():
                if section != "defaults":
                    out.setdefault(section, {}).update(values if isinstance(values, dict) else {"": values})
    return out


def test_a_row_states_only_what_its_bases_do_not():
    """No row sets a key to the value its bases already give it (the row would hide a change of the base)."""
    import yaml

    for name in EXPERIMENTS:
        if name.split("/")[0] not in ("hdml", "lifted", "dc", "mdl"):
            continue
        base = _base_values(name)
        assert base, f"{name}: extends no base"
        for section, values in yaml.safe_load((CONF / "experiment" / f"{name}.yaml").read_text()).items():
            if section in ("defaults", "reference"):
                continue
            for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
                assert base.get(section, {}).get(key, object()) != value, f"{name}: {section}.{key} repeats its base"


# ------------------------------------------------------------------- loss / method selection (the contract)

def test_a_loss_selects_the_only_method_that_trains_it_and_no_method_selects_a_loss(compose_cfg):
    """conf/loss/hdml_*.yaml select method=hdml and their sampler (and say so), the N-pair losses their sampler; no
    method config selects a loss
    (Hydra could not: conf/config.yaml lists loss after method). The documented commands compose."""
    import yaml

    selecting = {}
    for path in sorted((CONF / "loss").glob("*.yaml")):
        for entry in yaml.safe_load(path.read_text()).get("defaults") or []:
            if isinstance(entry, dict):
                for key, option in entry.items():
                    selecting.setdefault(path.stem, {})[key.removeprefix(OVERRIDE_PREFIX).split("@")[0]] = option
    assert selecting == {"hdml_npair": {"method": "hdml", "sampler": "npair"},
                         "hdml_triplet": {"method": "hdml", "sampler": "hdml_triplets"},
                         "npair": {"sampler": "npair"}, "angular_npair": {"sampler": "npair"}}
    for loss in ("npair", "angular_npair"):  # the N-pair losses read N classes x 2: they select that sampler only
        assert "SELECTS sampler=npair" in (CONF / "loss" / f"{loss}.yaml").read_text(), loss
        cfg = compose_cfg(f"loss={loss}")
        assert cfg.sampler._target_.endswith("NPairBatchSampler") and cfg.method._target_.endswith("StandardMethod")
        assert compose_cfg(f"loss={loss}", "sampler=class_balanced").sampler._target_.endswith(
            "ClassBalancedBatchSampler")  # the command line still wins
    for loss, chosen in ((k, v) for k, v in selecting.items() if "method" in v):
        text = (CONF / "loss" / f"{loss}.yaml").read_text()
        assert f"SELECTS method={chosen['method']} AND sampler={chosen['sampler']}" in text, loss
        choices = compose_cfg(f"loss={loss}", "dataset=cars196").method._target_
        assert choices.endswith("HDMLMethod")
    for path in sorted((CONF / "method").glob("*.yaml")):
        assert "override /loss" not in path.read_text(), f"{path.name}: a method cannot select a loss"
    assert "selects none" in (CONF / "method" / "divide_conquer.yaml").read_text()
    assert compose_cfg("method=divide_conquer").loss._target_ == compose_cfg().loss._target_
    for value in (0, 120):  # dml-run -m loss=hdml_npair loss.pulling_factor=0,30,60,90,120
        cfg = compose_cfg("loss=hdml_npair", f"loss.pulling_factor={value}")
        assert cfg.loss.pulling_factor == value and cfg.sampler._target_.endswith("NPairBatchSampler")


# ------------------------------------------------------------------------------- dataset files and their bases

def test_dataset_files_share_their_common_keys_and_read_paths_data_dir(compose_cfg, tmp_path):
    """conf/dataset/_base/ holds the keys every dataset shares (never a dataset= option); each root lies under
    paths.data_dir ($DML_DATA or ./data), written once in conf/paths/default.yaml."""
    import yaml

    common = set(yaml.safe_load((CONF / "dataset" / "_base" / "common.yaml").read_text()))
    images = set(yaml.safe_load((CONF / "dataset" / "_base" / "image_files.yaml").read_text())) - {"defaults"}
    for path in sorted((CONF / "dataset").glob("*.yaml")):
        text = path.read_text()
        assert "oc.env" not in text, f"{path.name}: read the data directory from paths.data_dir"
        own = set(yaml.safe_load(text)) - {"defaults"}
        assert not own & (common | images), f"{path.name} repeats {sorted(own & (common | images))}"
        cfg = compose_cfg(f"dataset={path.stem}", f"paths.data_dir={tmp_path}")
        assert common <= set(cfg.dataset) and cfg.dataset.seed == cfg.trainer.seed
        if "root" in cfg.dataset and cfg.dataset.root is not None:  # csv: null, the table's own folder
            assert images <= set(cfg.dataset) and cfg.dataset.root.startswith(f"{tmp_path}/"), path.name
