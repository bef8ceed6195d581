"""Token interventions on the visual residual stream, one file each, registered by name.

``list_interventions()`` lists them; ``register_intervention(name, build, config_type)`` adds one
(a test file can); ``build_intervention(name, n_blocks, config)`` makes a fresh instance.

Block defaults are the papers' choices for ViT-B/16 (12 blocks) carried to other depths:
TIR before blocks ``round(8n/12)`` and ``round(10n/12)`` (8 and 10 of 12; 4 and 5 of 6), ATHA's
initial alpha at block ``n // 2`` (6 of 12); a test-time register's neurons in blocks
``0..round(5n/12)`` (5 of 12). Each can be set explicitly.
"""

from cdfsl_core.interventions.atha import ATHA, EDIT_STATISTICS, ATHAConfig  # noqa: E402  (registers atha)
from cdfsl_core.interventions.base import (
                                           Intervention,
                                           InterventionSpec,
                                           NoConfig,
                                           NoIntervention,
                                           build_intervention,
                                           intervention_spec,
                                           list_interventions,
                                           register_intervention,
                                           unregister_intervention,
)
from cdfsl_core.interventions.test_time_register import (  # noqa: E402  (registers the test-time registers)
                                           TestTimeRegister,
                                           TIRWithRegister,
                                           find_register_neurons,
)
from cdfsl_core.interventions.tir import TIR, TIRConfig  # noqa: E402  (registers tir)

__all__ = ["ATHA", "ATHAConfig", "EDIT_STATISTICS", "Intervention", "InterventionSpec", "NoConfig", "NoIntervention",
           "TIR", "TIRConfig", "TIRWithRegister", "TestTimeRegister", "build_intervention", "find_register_neurons", "intervention_spec", "list_interventions", "register_intervention",
           "unregister_intervention"]
