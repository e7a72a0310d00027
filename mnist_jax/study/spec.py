"""Study configs: the legacy ML Engine form and the Vertex AI form, read, checked and converted.

Owns the study schema. A legacy config is `trainingInput.hyperparameters`
(goal, hyperparameterMetricTag, maxTrials, maxParallelTrials, maxFailedTrials,
algorithm, enableTrialEarlyStopping, params); a Vertex config is an
hp-tuning-jobs config (`studySpec` with metrics, parameters, algorithm,
medianAutomatedStoppingSpec, measurementSelectionType; maxTrialCount,
parallelTrialCount, maxFailedTrialCount). Both become one `Study`, and
`to_vertex` writes the Vertex form of any study. What a local study cannot do
as Vertex does is refused with a one-line error: a DOUBLE parameter in a grid
(as Vertex refuses it) and decay-curve stopping.

Scale types map u in [0, 1] onto [a, b] as Vertex and Open Source Vizier do:
linear `a + u(b - a)`, log `a (b/a)^u`, reverse log `a + b - a (b/a)^(1-u)`
(dense near b).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mnist_jax.common.cli import did_you_mean, read_mapping
from mnist_jax.common.errors import ConfigError

SCALE_TYPES = ("NONE", "UNIT_LINEAR_SCALE", "UNIT_LOG_SCALE", "UNIT_REVERSE_LOG_SCALE")
PARAMETER_TYPES = ("DOUBLE", "INTEGER", "CATEGORICAL", "DISCRETE")
# Vertex's algorithms; the legacy BAYESIAN_OPTIMIZATION is Vertex's default, ALGORITHM_UNSPECIFIED.
ALGORITHMS = ("ALGORITHM_UNSPECIFIED", "GRID_SEARCH", "RANDOM_SEARCH")
LEGACY_ALGORITHMS = {"BAYESIAN_OPTIMIZATION": "ALGORITHM_UNSPECIFIED"}
MEASUREMENT_SELECTIONS = ("LAST_MEASUREMENT", "BEST_MEASUREMENT")
GOALS = ("MAXIMIZE", "MINIMIZE")
_VALUE_SPECS = {
    "DOUBLE": "doubleValueSpec",
    "INTEGER": "integerValueSpec",
    "CATEGORICAL": "categoricalValueSpec",
    "DISCRETE": "discreteValueSpec",
}
# The trial job of the Vertex form: the trainer's container; scripts/submit_vertex_hpt.sh fills
# in IMAGE_URI and BUCKET. Vertex gives each trial AIP_MODEL_DIR under baseOutputDirectory/<trial>.
TRIAL_JOB_SPEC = {
    "workerPoolSpecs": [
        {
            "machineSpec": {"machineType": "n1-standard-4"},
            "replicaCount": 1,
            "containerSpec": {"imageUri": "IMAGE_URI", "args": ["--train-file=gs://BUCKET/data/mnist.pkl"]},
        }
    ],
    "baseOutputDirectory": {"outputUriPrefix": "gs://BUCKET/hptuning"},
}


@dataclasses.dataclass(frozen=True)
class Parameter:
    name: str
    type: str
    min_value: float | None = None
    max_value: float | None = None
    values: tuple[Any, ...] = ()
    scale: str = "NONE"


@dataclasses.dataclass(frozen=True)
class Study:
    goal: str  # MAXIMIZE or MINIMIZE
    metric: str
    parameters: tuple[Parameter, ...]
    max_trials: int
    parallel_trials: int
    max_failed_trials: int
    algorithm: str = "ALGORITHM_UNSPECIFIED"
    median_stopping: bool = False  # medianAutomatedStoppingSpec, or legacy enableTrialEarlyStopping
    measurement_selection: str = "LAST_MEASUREMENT"


# The keys each level of a study config may hold (Vertex AI's HyperparameterTuningJob and ML Engine's
# TrainingInput), to catch a misspelt key before anything trains: None means any key (what only Vertex reads).
_ANY = None
_VALUE_SPEC_KEYS = {"minValue": _ANY, "maxValue": _ANY, "values": _ANY, "defaultValue": _ANY}
_VERTEX_SCHEMA: dict[str, Any] = {
    "displayName": _ANY,
    "labels": _ANY,
    "encryptionSpec": _ANY,
    "maxTrialCount": _ANY,
    "parallelTrialCount": _ANY,
    "maxFailedTrialCount": _ANY,
    "trialJobSpec": _ANY,
    "studySpec": {
        "metrics": [{"metricId": _ANY, "goal": _ANY, "safetyConfig": _ANY}],
        "parameters": [
            {
                "parameterId": _ANY,
                "scaleType": _ANY,
                "conditionalParameterSpecs": _ANY,
                **{key: _VALUE_SPEC_KEYS for key in _VALUE_SPECS.values()},
            }
        ],
        "algorithm": _ANY,
        "observationNoise": _ANY,
        "measurementSelectionType": _ANY,
        "medianAutomatedStoppingSpec": {"useElapsedDuration": _ANY},
        "decayCurveStoppingSpec": {"useElapsedDuration": _ANY},
        "convexAutomatedStoppingSpec": _ANY,
        "studyStoppingConfig": _ANY,
    },
}
_HYPERPARAMETERS_SCHEMA: dict[str, Any] = {
    "goal": _ANY,
    "hyperparameterMetricTag": _ANY,
    "maxTrials": _ANY,
    "maxParallelTrials": _ANY,
    "maxFailedTrials": _ANY,
    "enableTrialEarlyStopping": _ANY,
    "resumePreviousJobId": _ANY,
    "algorithm": _ANY,
    "params": [
        {
            "parameterName": _ANY,
            "type": _ANY,
            "minValue": _ANY,
            "maxValue": _ANY,
            "categoricalValues": _ANY,
            "discreteValues": _ANY,
            "scaleType": _ANY,
        }
    ],
}
_TRAINING_INPUT_KEYS = (
    "scaleTier", "masterType", "masterConfig", "workerType", "workerConfig", "parameterServerType",
    "parameterServerConfig", "evaluatorType", "evaluatorConfig", "workerCount", "parameterServerCount",
    "evaluatorCount", "packageUris", "pythonModule", "args", "region", "jobDir", "runtimeVersion",
    "pythonVersion", "encryptionConfig", "scheduling", "network", "serviceAccount", "useChiefInTfConfig",
    "enableWebAccess",
)  # fmt: skip
_LEGACY_SCHEMA: dict[str, Any] = {
    "trainingInput": {"hyperparameters": _HYPERPARAMETERS_SCHEMA, **dict.fromkeys(_TRAINING_INPUT_KEYS)},
    "labels": _ANY,
}


def _check_keys(value: Any, schema: Any, where: str) -> None:
    """Every key in `value` is one `schema` knows, at every level; raises ConfigError naming the first that is not."""
    if schema is _ANY:
        return
    if isinstance(schema, list):
        _require(isinstance(value, list), f"{where} must be a list")
        for i, item in enumerate(value, 1):
            _check_keys(item, schema[0], f"{where}[{i}]")
        return
    _require(isinstance(value, dict), f"{where or 'the config'} must be a mapping")
    for key, item in value.items():
        if key not in schema:
            raise ConfigError(f"unknown key {where + '.' if where else ''}{key}{did_you_mean(str(key), schema)}")
        _check_keys(item, schema[key], f"{where + '.' if where else ''}{key}")


def _required(mapping: dict[str, Any], key: str, where: str) -> Any:
    _require(key in mapping, f"{where} has no {key}")
    return mapping[key]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_parameter(p: Parameter) -> Parameter:
    _require(p.type in PARAMETER_TYPES, f"parameter {p.name}: type must be one of {PARAMETER_TYPES}, got {p.type}")
    _require(p.scale in SCALE_TYPES, f"parameter {p.name}: scaleType must be one of {SCALE_TYPES}, got {p.scale}")
    if p.type in ("CATEGORICAL", "DISCRETE"):
        _require(bool(p.values), f"parameter {p.name}: {p.type} needs values")
    else:
        _require(
            p.min_value is not None and p.max_value is not None and p.min_value <= p.max_value,
            f"parameter {p.name}: needs minValue <= maxValue",
        )
        if p.scale in ("UNIT_LOG_SCALE", "UNIT_REVERSE_LOG_SCALE"):
            _require(p.min_value > 0, f"parameter {p.name}: a log scale needs minValue > 0")  # type: ignore[operator]
    return p


def _check_study(study: Study) -> Study:
    _require(study.goal in GOALS, f"goal must be one of {GOALS}, got {study.goal}")
    _require(study.algorithm in ALGORITHMS, f"algorithm must be one of {ALGORITHMS}, got {study.algorithm}")
    _require(
        study.measurement_selection in MEASUREMENT_SELECTIONS,
        f"measurementSelectionType must be one of {MEASUREMENT_SELECTIONS}, got {study.measurement_selection}",
    )
    _require(bool(study.parameters), "a study needs at least one parameter")
    _require(min(study.max_trials, study.parallel_trials, study.max_failed_trials) >= 1, "trial counts must be >= 1")
    if study.algorithm == "GRID_SEARCH":
        doubles = [p.name for p in study.parameters if p.type == "DOUBLE"]
        _require(
            not doubles,
            f"GRID_SEARCH takes only DISCRETE, CATEGORICAL and INTEGER parameters; {', '.join(doubles)} is DOUBLE",
        )
    return study


def study_from_legacy(document: dict[str, Any]) -> Study:
    """Reads `trainingInput.hyperparameters` (ML Engine / AI Platform Training)."""
    if "hyperparameters" in document and "trainingInput" not in document:
        document = {"trainingInput": document}  # the hyperparameters alone, as the seed's YAML nests them too
    _check_keys(document, _LEGACY_SCHEMA, "")
    spec = document.get("trainingInput", {}).get("hyperparameters")
    _require(
        isinstance(spec, dict),
        "not a Vertex study config (no studySpec) nor a legacy one (no trainingInput.hyperparameters)",
    )
    parameters = tuple(
        _check_parameter(
            Parameter(
                name=_required(p, "parameterName", f"trainingInput.hyperparameters.params[{i}]"),
                type=_required(p, "type", f"parameter {p['parameterName']}"),
                min_value=p.get("minValue"),
                max_value=p.get("maxValue"),
                values=tuple(p.get("categoricalValues") or p.get("discreteValues") or ()),
                scale=p.get("scaleType", "NONE"),
            )
        )
        for i, p in enumerate(spec.get("params", []), 1)
    )
    max_trials = int(spec.get("maxTrials", 1))
    algorithm = spec.get("algorithm", "ALGORITHM_UNSPECIFIED")
    return _check_study(
        Study(
            goal=spec.get("goal", "MAXIMIZE"),
            metric=spec.get("hyperparameterMetricTag", "accuracy"),
            parameters=parameters,
            max_trials=max_trials,
            parallel_trials=int(spec.get("maxParallelTrials", 1)),
            max_failed_trials=int(spec.get("maxFailedTrials") or max_trials),
            algorithm=LEGACY_ALGORITHMS.get(algorithm, algorithm),
            median_stopping=bool(spec.get("enableTrialEarlyStopping", False)),
        )
    )


def study_from_vertex(document: dict[str, Any]) -> Study:
    """Reads a Vertex AI hyperparameter tuning job config (`studySpec`, counts)."""
    _check_keys(document, _VERTEX_SCHEMA, "")
    spec = document["studySpec"]
    _require(
        "decayCurveStoppingSpec" not in spec,
        "decayCurveStoppingSpec is not supported by local studies; use medianAutomatedStoppingSpec",
    )
    metrics = _required(spec, "metrics", "studySpec")
    _require(len(metrics) == 1, f"studySpec.metrics must hold one metric, not {len(metrics)}")
    metric = metrics[0]
    for key in ("metricId", "goal"):
        _required(metric, key, "studySpec.metrics[1]")
    parameters = []
    for i, p in enumerate(_required(spec, "parameters", "studySpec"), 1):
        name = _required(p, "parameterId", f"studySpec.parameters[{i}]")
        kinds = [t for t, key in _VALUE_SPECS.items() if key in p]
        _require(len(kinds) == 1, f"parameter {name}: needs one of {', '.join(_VALUE_SPECS.values())}")
        kind = kinds[0]
        values = p[_VALUE_SPECS[kind]]
        parameters.append(
            _check_parameter(
                Parameter(
                    name=name,
                    type=kind,
                    min_value=values.get("minValue"),
                    max_value=values.get("maxValue"),
                    values=tuple(values.get("values", ())),
                    scale=p.get("scaleType", "NONE"),
                )
            )
        )
    max_trials = int(document.get("maxTrialCount", 1))
    return _check_study(
        Study(
            goal=metric["goal"],
            metric=metric["metricId"],
            parameters=tuple(parameters),
            max_trials=max_trials,
            parallel_trials=int(document.get("parallelTrialCount", 1)),
            max_failed_trials=int(document.get("maxFailedTrialCount") or max_trials),
            algorithm=spec.get("algorithm", "ALGORITHM_UNSPECIFIED"),
            median_stopping="medianAutomatedStoppingSpec" in spec,
            measurement_selection=spec.get("measurementSelectionType", "LAST_MEASUREMENT"),
        )
    )


def load_study(path: str) -> tuple[Study, dict[str, Any]]:
    """Reads a legacy or Vertex study config (local or gs://); returns it and the raw document."""
    document = read_mapping(path, "study config")
    try:
        study = study_from_vertex(document) if "studySpec" in document else study_from_legacy(document)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, ConfigError):
            raise ConfigError(f"{path}: {e}") from None
        raise ConfigError(f"{path}: not a legacy or Vertex study config: {type(e).__name__} {e}") from None
    return study, document


def to_vertex(study: Study) -> dict[str, Any]:
    """The Vertex AI hp-tuning-jobs config of `study`."""
    parameters = []
    for p in study.parameters:
        if p.type in ("CATEGORICAL", "DISCRETE"):
            values: dict[str, Any] = {"values": list(p.values)}
        elif p.type == "INTEGER":
            values = {"minValue": int(p.min_value), "maxValue": int(p.max_value)}  # type: ignore[arg-type]
        else:
            values = {"minValue": p.min_value, "maxValue": p.max_value}
        entry: dict[str, Any] = {"parameterId": p.name, _VALUE_SPECS[p.type]: values}
        if p.scale != "NONE" and p.type in ("DOUBLE", "INTEGER"):
            entry["scaleType"] = p.scale
        parameters.append(entry)
    spec: dict[str, Any] = {
        "metrics": [{"metricId": study.metric, "goal": study.goal}],
        "parameters": parameters,
        "algorithm": study.algorithm,
        "measurementSelectionType": study.measurement_selection,
    }
    if study.median_stopping:
        spec["medianAutomatedStoppingSpec"] = {"useElapsedDuration": False}
    return {
        "studySpec": spec,
        "maxTrialCount": study.max_trials,
        "parallelTrialCount": study.parallel_trials,
        "maxFailedTrialCount": study.max_failed_trials,
        "trialJobSpec": TRIAL_JOB_SPEC,
    }
