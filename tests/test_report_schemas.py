"""Real outputs against their JSON Schemas (docs/schemas/): an export's report and plan, `cptq verify`'s
report.json, and the dataclasses that write them naming the same fields as the schemas."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jsonschema
import pytest
from referencing import Registry, Resource

from cptquant.api import short_verification
from cptquant.exporter.pipeline import export_quantized
from cptquant.layer_graph import LayerGraph
from cptquant.model_loading import wrap_model
from cptquant.options import CalibrationOptions
from cptquant.passes.measurements import CalibrationMeasurements
from cptquant.plan import Plan, uniform_plan
from cptquant.quant.storage import FORMAT_DYNAMIC
from cptquant.reports import ExportReport, VerifyReport
from cptquant.runtimes.verify import verify_output
from cptquant.runtimes.verify_reports import write_reports
from cptquant.testing import tiny_bert, tiny_llama

SCHEMAS = Path(__file__).resolve().parents[1] / "docs" / "schemas"


def _schema(name: str) -> dict:
    return json.loads((SCHEMAS / name).read_text())


def validator(name: str) -> jsonschema.protocols.Validator:
    registry = Registry().with_resources(
        (path.name, Resource.from_contents(json.loads(path.read_text()))) for path in SCHEMAS.glob("*.json"))
    schema = _schema(name)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, registry=registry)


def _errors(name: str, instance) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(name).iter_errors(instance)]


@pytest.fixture(scope="module")
def verified_export(tmp_path_factory):
    """A tiny BERT at 4 bits with the export's short verification, then `cptq verify --quick` on it."""
    loaded = wrap_model(tiny_bert())
    folder = tmp_path_factory.mktemp("bert4")
    export_quantized(loaded, lambda _l, graph: uniform_plan(graph, 4), folder / "model.onnx", progress=False,
                     verify=short_verification)
    result = verify_output(folder, quick=True, progress=False, loaded=loaded, ep="cpu")
    json_path, _ = write_reports(result, folder / "verify")
    return folder, json_path


def test_an_export_report_with_its_verification_matches_the_schema(verified_export):
    folder, _ = verified_export
    report = json.loads((folder / "model.report.json").read_text())
    assert "quality" in report["verification"]  # the figures themselves were checked, not an error
    assert _errors("export-report.schema.json", report) == []


def test_a_plan_matches_the_schema(verified_export):
    folder, _ = verified_export
    assert _errors("plan.schema.json", json.loads((folder / "model.plan.json").read_text())) == []


def test_a_verify_report_matches_the_schema(verified_export):
    _, json_path = verified_export
    report = json.loads(json_path.read_text())
    assert report["eps"]["cpu"]["speed"]["vs_fp32"]["geomean_speedup"] > 0
    assert _errors("verify-report.schema.json", report) == []


def test_a_dynamic_causal_lm_export_report_matches_the_schema(tmp_path):
    """The optional fields: genai_config (causal LMs), outlier_ratio and reduce_range (dynamic), calibration_text,
    hot rows."""
    loaded = wrap_model(tiny_llama())
    result = export_quantized(loaded, lambda _l, graph: uniform_plan(graph, 4), tmp_path / "model.onnx",
                              progress=False, fmt=FORMAT_DYNAMIC, outlier_ratio=1.5, reduce_range=True,
                              calibration=CalibrationMeasurements(CalibrationOptions(calib_samples=16, seq_len=32)))
    report = json.loads((tmp_path / "model.report.json").read_text())
    assert report == result.report.to_dict()
    assert {"genai_config", "outlier_ratio", "reduce_range", "calibration_text"} <= set(report)
    assert _errors("export-report.schema.json", report) == []
    assert _errors("plan.schema.json", json.loads((tmp_path / "model.plan.json").read_text())) == []


def test_a_report_with_16_bit_layers_matches_the_schema(tmp_path):
    """A 16-bit layer has no block size: the report writes null there (found by mypy on build_report)."""
    loaded = wrap_model(tiny_llama())

    def plan_with_fp16_layers(_loaded: object, graph: LayerGraph) -> Plan:
        plan = uniform_plan(graph, 4)
        for name, lp in plan.layers.items():
            if name.endswith("down_proj"):
                plan.layers[name] = dataclasses.replace(lp, bits=16)
        return plan

    export_quantized(loaded, plan_with_fp16_layers, tmp_path / "model.onnx", progress=False)
    report = json.loads((tmp_path / "model.report.json").read_text())
    fp16 = [layer for layer in report["layers"].values() if layer["bits"] == 16]
    assert fp16 and all(layer["block_size"] is None for layer in fp16)
    assert _errors("export-report.schema.json", report) == []


def test_the_schemas_refuse_what_the_writers_never_write(verified_export):
    folder, json_path = verified_export
    report = json.loads((folder / "model.report.json").read_text())
    assert _errors("export-report.schema.json", {**report, "surprise": 1}) != []
    assert _errors("export-report.schema.json", {k: v for k, v in report.items() if k != "layers"}) != []
    assert _errors("export-report.schema.json", {**report, "schema_version": 2}) != []
    verify = json.loads(json_path.read_text())
    assert _errors("verify-report.schema.json", {**verify, "passed": "yes"}) != []


@pytest.mark.parametrize("record,schema", [(ExportReport, "export-report.schema.json"),
                                           (VerifyReport, "verify-report.schema.json")])
def test_the_dataclasses_and_the_schemas_name_the_same_fields(record, schema):
    fields = {f.name for f in dataclasses.fields(record)}
    properties = set(_schema(schema)["properties"])
    assert fields == properties
    required = {f.name for f in dataclasses.fields(record)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    assert required <= set(_schema(schema)["required"])
