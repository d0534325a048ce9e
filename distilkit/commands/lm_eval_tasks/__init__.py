"""lm-evaluation-harness tasks that ship with distilkit and need no network.

``distilkit evaluate --lm_eval_tasks [distilkit_python_reference]`` finds them by name; each YAML here is
an ordinary harness task, so ``lm_eval --include_path <this directory>`` runs them too.
"""
