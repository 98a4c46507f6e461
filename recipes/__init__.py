"""The bundled recipes, installed as the package ``s2ft_cli.recipes`` (see pyproject.toml).

Only the YAML files beside this one matter; ``s2ft recipes`` lists them and ``s2ft init``
copies one out to edit.
"""
