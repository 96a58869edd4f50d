"""Physics: one linear-operator interface for every task (DESIGN §3).

- :mod:`~d3ip_cli.physics.base`: ``LinearOperator`` (``A``, ``A_adjoint``/``.H``, ``normal``, ``@``,
  ``pinv``, ``select``) and the property checks;
- :mod:`~d3ip_cli.physics.registry`: task names and options -> operators (``make_operator``),
  CT backends, measurement specs, the property-test cases;
- :mod:`~d3ip_cli.physics.ct` (native projector, FBP), :mod:`~d3ip_cli.physics.ct_plugins`
  (astra-toolbox, torch-radon), :mod:`~d3ip_cli.physics.mri` (Cartesian SENSE, coil maps),
  :mod:`~d3ip_cli.physics.masks`, :mod:`~d3ip_cli.physics.noise`,
  :mod:`~d3ip_cli.physics.finite_diff`, :mod:`~d3ip_cli.physics.solvers` (CG, prox, CGLS),
  :mod:`~d3ip_cli.physics.checks` (``d3ip operators --check``).

This package never imports the prior; the engine wires the two together.
"""
