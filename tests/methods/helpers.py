"""Build TensorInputs for a registered method with its default parameters (test helper)."""

from mergelab.methods.registry import REQUIRED, TensorInputs, TensorSource, ModelScope, get_method


def inputs_for(method_name, base, models, name="w", layer=None, num_layers=None, seed=0, **params):
    m = get_method(method_name)
    glob = {p.name: params.pop(p.name, p.default) for p in m.params}
    per_model = []
    for i in range(len(models)):
        row = {}
        for p in m.model_params:
            v = params.get(p.name, p.default)
            row[p.name] = v[i] if isinstance(v, (list, tuple)) else v
        per_model.append(row)
    x = TensorInputs(name=name, shape=tuple(models[0].shape), base=base, models=list(models), params=glob,
                     model_params=per_model, seed=seed, rows=(0, models[0].shape[0] if models[0].dim() else 0),
                     layer=layer, num_layers=num_layers)
    for p in list(glob.values()) + [v for r in per_model for v in r.values()]:
        assert p is not REQUIRED, f"test must give every required parameter of {method_name}"
    if m.prepare_tensor is not None:
        src = TensorSource(name, x.shape, glob, per_model, len(models), 1, lambda: iter([x]))
        x.tensor_stats = m.prepare_tensor(src)
    if m.prepare_model is not None:
        scope = ModelScope(glob, per_model, len(models), lambda: iter([x]))
        x.model_stats = m.prepare_model(scope)
    return x


def run(method_name, base, models, **params):
    return get_method(method_name).merge(inputs_for(method_name, base, models, **params))
