"""PF-MSMTrec (Ding et al., arXiv 2406.18938): personalized federated multi-scenario multi-task
recommendation. Each scenario is a client (``train_mode: federated``) holding an MMoE whose
experts follow a *parameter template*:

* global-shared experts (``experts.shared.*``): every task's gate mixes them; aggregated;
* task-specific experts (``experts.task_<t>.*``): only task t's gate mixes them; aggregated;
* scenario-specific experts (``experts.scenario.*``): every gate mixes them; never leave the client.

``parameter_template: False`` gives plain MMoE experts, all aggregated (the ablation). Federated
BN (``fed_bn``) keeps the experts' BatchNorm parameters and statistics on the client. The
server-side rules (conflict-averse and personalized aggregation of experts, personalized
aggregation of towers) are the ``pfmsmtrec`` strategy (``recbole_cmr.federated.personalized``).
"""

from recbole_cmr.model.context_aware_recommender.mmoe import MMoE
from recbole_cmr.utils import matching


class PFMSMTrec(MMoE):
    """MMoE with the parameter template; ``federated_local_params``: what never leaves a client."""

    def __init__(self, config, dataset):
        self.template = bool(config["parameter_template"])
        super().__init__(config, dataset)
        patterns = list(config["template_scenario_params"] or []) if self.template else []
        if config["fed_bn"]:
            patterns += list(config["fed_bn_params"] or [])
        self.federated_local_params = patterns

    def expert_groups(self, config):
        """``{group: n}``: template ``[shared, per task, scenario]`` (default [4, 1, 2]: 8 experts
        with two tasks), or ``n_experts`` plain experts without the template."""
        if not self.template:
            return super().expert_groups(config)
        n_shared, n_task, n_scenario = config["template_experts"]
        groups = {"shared": n_shared, **{f"task_{t}": n_task for t in range(self.n_tasks)},
                  "scenario": n_scenario}
        return {g: n for g, n in groups.items() if n > 0}

    def visible_experts(self, task):
        if not self.template:
            return super().visible_experts(task)
        mine = {"shared", f"task_{task}", "scenario"}
        return [(g, k) for g, experts in self.experts.items() if g in mine
                for k in range(len(experts))]

    def template_parts(self, config):
        """``{"global": [...], "task": [...], "scenario": [...]}``: the parameter names each part
        of the template's patterns selects (scenario-specific ones stay on the client)."""
        names = list(self.state_dict())
        return {part: matching(names, config[f"template_{part}_params"] or [])
                for part in ("global", "task", "scenario")}
