"""The REST service's published contract: request and response models, and its OpenAPI document.

The routes of :mod:`trackflow.serving.app` read raw bytes and write JSON themselves (the fast path);
the pydantic models here describe what they take and give, for ``GET /openapi.json`` and
``/docs``. Once a version is served, the document names its exact columns and the range each
takes (:attr:`~trackflow.registry.packaging.Scorer.limits`), so a client generated from it, or a
fuzzer, sends what the service accepts.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel

#: A JSON scalar: a class label or an output value.
Scalar = int | float | str | bool
#: One raw row, ``{column: number}``; ``null`` only for a model that imputes.
Row = dict[str, float | None]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    """Every refusal: a code and a one-line message saying what is wrong and how to fix it."""

    error_code: str = Field(examples=["INVALID_INPUT"])
    message: str


class Health(BaseModel):
    """``GET /health``: the process is up."""

    status: str = Field(examples=["ok"])


class Ready(BaseModel):
    """``GET /ready`` and ``GET /ping``: the version that answers."""

    ready: bool
    name: str
    version: str


class PredictionRequest(_Strict):
    """``POST /models/NAME/predictions``: raw rows under the model's columns, in any order."""

    rows: list[Row] = Field(min_length=1)


class ModelRef(BaseModel):
    """The registered model and version that answered."""

    name: str
    version: str


class Prediction(BaseModel):
    """One row's answer."""

    label: Scalar
    probabilities: dict[str, float]
    anomaly_score: float
    is_anomaly: bool


class PredictionResponse(BaseModel):
    """The answer to ``POST /models/NAME/predictions``, one prediction per row, in order."""

    model: ModelRef
    predictions: list[Prediction]


class DataframeSplit(_Strict):
    """pandas' ``orient="split"``: column names, then rows of values in that order."""

    columns: list[str]
    data: list[list[float | None]] = Field(min_length=1)
    index: list[Any] | None = None


class SplitBody(_Strict):
    """MLflow's ``dataframe_split`` format."""

    dataframe_split: DataframeSplit


class RecordsBody(_Strict):
    """MLflow's ``dataframe_records`` format."""

    dataframe_records: list[Row] = Field(min_length=1)


class InstancesBody(_Strict):
    """MLflow's ``instances`` format (rows as objects)."""

    instances: list[Row] = Field(min_length=1)


class InputsBody(_Strict):
    """MLflow's ``inputs`` format: rows as objects (``{column: [values]}`` is taken too)."""

    inputs: list[Row] = Field(min_length=1)


class InvocationRequest(RootModel[SplitBody | RecordsBody | InstancesBody | InputsBody]):
    """``POST /invocations``: exactly one of MLflow's JSON formats (or CSV, ``text/csv``)."""


class InvocationResponse(BaseModel):
    """MLflow's answer shape: one record per row, the packaged model's output columns."""

    predictions: list[dict[str, Scalar]]


class Refusal(BaseModel):
    """A version the service would not serve, and why."""

    version: str
    error: str
    at: str


class Poll(BaseModel):
    """How often the alias is read, and when it last was."""

    interval_s: float
    last_checked: str | None


class InputSchema(BaseModel):
    """The served version's columns (null before one is served) and the row limit."""

    columns: list[str] | None
    type: str
    max_rows: int


class ModelDescription(BaseModel):
    """``GET /models/NAME``: the served version, its lineage, and the follower's state."""

    name: str
    alias: str
    version: str | None
    run_id: str | None
    source: str | None
    loaded_at: str | None
    classes: list[Scalar] | None
    lineage: dict[str, dict[str, str]] | None
    status: str
    refused: list[Refusal]
    poll: Poll
    input_schema: InputSchema


#: Request bodies, by (path template, method), documented on the routes that read raw bytes.
REQUEST_MODELS: dict[tuple[str, str], type[BaseModel]] = {
    ("/models/{name}/predictions", "post"): PredictionRequest,
    ("/invocations", "post"): InvocationRequest,
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route that may refuse with these statuses, as :class:`ErrorBody`."""
    return {status: {"model": ErrorBody} for status in statuses}


def add_request_bodies(document: dict[str, Any]) -> None:
    """Document the JSON request body of each route in :data:`REQUEST_MODELS`, in place."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for (path, method), model in REQUEST_MODELS.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        operation = document["paths"][path][method]
        content = {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
        }
        operation["requestBody"] = {"required": True, "content": content}


def drop_validation_errors(document: dict[str, Any]) -> None:
    """Remove the 422 FastAPI documents for its own parameter validation, in place.

    The service validates nothing through FastAPI; its 422s are :class:`ErrorBody` refusals.
    """
    for path in document["paths"].values():
        for operation in path.values():
            answer = operation["responses"].get("422", {})
            if "HTTPValidationError" in str(answer):
                del operation["responses"]["422"]
    for name in ("HTTPValidationError", "ValidationError"):
        document.get("components", {}).get("schemas", {}).pop(name, None)


def add_bearer(document: dict[str, Any], guarded: Sequence[tuple[str, str]]) -> None:
    """Declare the bearer token on the ``guarded`` (path, method) operations, in place."""
    components = document.setdefault("components", {})
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, method in guarded:
        operation = document["paths"][path][method]
        operation["security"] = [{"bearer": []}]
        operation["responses"]["401"] = _error_response("missing or wrong bearer token")


def for_model(
    document: dict[str, Any],
    name: str,
    columns: Sequence[str],
    limits: tuple[Sequence[float], Sequence[float]],
    imputes: bool,
    max_rows: int,
) -> dict[str, Any]:
    """A copy of ``document`` that names the served model and the exact rows it takes.

    Args:
        document: The generic document (any columns).
        name: The registered model's name (the only ``{name}`` that is not a 404).
        columns: Its raw feature columns, in order.
        limits: Lowest and highest value of each column (``Scorer.limits``).
        imputes: Whether ``null`` (a missing value) is taken.
        max_rows: Most rows in one request.
    """
    document = copy.deepcopy(document)
    cells = [_cell(low, high, imputes) for low, high in zip(*limits, strict=True)]
    schemas = document["components"]["schemas"]
    row = {
        "type": "object",
        "properties": dict(zip(columns, cells, strict=True)),
        "required": list(columns),
        "additionalProperties": False,
    }
    rows = {"type": "array", "items": {"$ref": "#/components/schemas/Row"}}
    rows |= {"minItems": 1, "maxItems": max_rows}
    schemas["Row"] = row
    schemas["PredictionRequest"]["properties"]["rows"] = rows
    for key in ("RecordsBody", "InstancesBody", "InputsBody"):
        field = next(iter(schemas[key]["properties"]))
        schemas[key]["properties"][field] = rows
    width = len(columns)
    split = schemas["DataframeSplit"]["properties"]
    split["columns"] = {"type": "array", "const": list(columns)}
    values = {"type": "array", "prefixItems": cells, "items": False, "minItems": width}
    split["data"] = {"type": "array", "items": values, "minItems": 1, "maxItems": max_rows}
    for path in document["paths"].values():
        for operation in path.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "name" and parameter["in"] == "path":
                    parameter["schema"] = {"type": "string", "enum": [name]}
    return document


def _cell(low: float, high: float, imputes: bool) -> dict[str, Any]:
    """The schema of one value: a number in ``[low, high]`` (an infinite end: none)."""
    ends = (("minimum", float(low)), ("maximum", float(high)))
    number = {"type": "number"} | {key: value for key, value in ends if math.isfinite(value)}
    return {"anyOf": [number, {"type": "null"}]} if imputes else number


def _error_response(description: str) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/ErrorBody"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}
