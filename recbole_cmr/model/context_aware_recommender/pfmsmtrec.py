"""PF-MSMTrec (Ding et al., arXiv 2406.18938): personalized federated multi-scenario multi-task
recommendation. Each scenario is a client (``train_mode: federated``) holding an MMoE whose
experts follow a *parameter template*:

* global-shared experts (``experts.shared.*``): every task's gate mixes them; aggregated;
* task-specific experts (``experts.task_<t>.*``): only task t's gate mixes them; aggregated;
* scenario-specific experts (``experts.scenario.*``, selected by ``template_scenario_params``):
  every gate mixes them. Two readings of the paper (``scenario_experts``): ``local`` (default),
  they never leave the client (patterns that leave one shared are an error); ``personalized``,
  they go to the server and come back through the ``pfmsmtrec`` strategy's personalized expert
  rule, ``θ_i = start_i + Δ_i + a_i · Δ_ca``: each scenario keeps its own experts, moved by a
  learnt share of all scenarios' conflict-averse direction. (Aggregating them over "the clients
  of the same scenario type" is ``local`` here, as each scenario is one client.)

``parameter_template: False`` gives plain MMoE experts, all aggregated (the ablation). Federated
BN (``fed_bn``) keeps the BatchNorm parameters and statistics that ``fed_bn_params`` selects on
the client. A pattern of either setting that matches no parameter is an error when set by the
user (:func:`recbole_cmr.utils.check_patterns`). Everything else (embeddings, gates, towers) is
aggregated. The server-side rules (conflict-averse and personalized aggregation of experts,
personalized aggregation of towers) are the ``pfmsmtrec`` strategy
(``recbole_cmr.federated.personalized``).
"""

from recbole_cmr.model.context_aware_recommender.mmoe import MMoE
from recbole_cmr.utils import matching, pattern_setting, user_set

# The pattern settings of what stays on the client, each read only when its switch is on.
LOCAL_PATTERN_SETTINGS = {"template_scenario_params": "parameter_template", "fed_bn_params": "fed_bn"}
SCENARIO_EXPERTS = ("local", "personalized")


class PFMSMTrec(MMoE):
    """MMoE with the parameter template; ``federated_local_params``: what never leaves a client."""

    def __init__(self, config, dataset):
        self.template = bool(config["parameter_template"])
        super().__init__(config, dataset)
        self.federated_local_params = self.local_patterns(config)

    def local_patterns(self, config):
        """The patterns of the parameters that never leave a client: ``template_scenario_params``
        (with the template and ``scenario_experts: local``) and ``fed_bn_params`` (with
        ``fed_bn``), checked against the model's parameter names
        (:func:`~recbole_cmr.utils.check_patterns`).

        Raises:
            ValueError: a pattern the user set matches no parameter; one of the two settings set
                while its switch is off; the patterns leave a scenario-specific expert shared; or
                ``scenario_experts`` is unknown, or ``personalized`` without the strategy that
                keeps each client's own experts (:func:`check_scenario_sharing`).
        """
        names = list(self.state_dict())
        patterns = []
        personal = self.template and check_scenario_sharing(config) == "personalized"
        for key, switch in LOCAL_PATTERN_SETTINGS.items():
            if personal and key == "template_scenario_params":
                if user_set(config, key):
                    raise ValueError(f"{key} is read only with scenario_experts: local (with "
                                     "personalized, the scenario-specific experts go to the "
                                     f"server); drop {key} or set scenario_experts: local.")
            elif config[switch]:
                patterns += pattern_setting(config, key, names)
            elif user_set(config, key):
                raise ValueError(f"{key} is read only with {switch}: True; drop {key} or set "
                                 f"{switch}: True.")
        shared = [] if personal else [n for n in self.scenario_param_names()
                                      if not matching([n], patterns)]
        if shared:
            raise ValueError(f"template_scenario_params {config['template_scenario_params']} "
                             f"leaves scenario-specific expert parameters {shared[:4]} shared; "
                             "they must stay on the client: use [\"experts.scenario.*\"].")
        return patterns

    def scenario_param_names(self):
        """The state-dict names of the scenario-specific experts (none without the template)."""
        if "scenario" not in self.experts:
            return []
        return [f"experts.scenario.{n}" for n in self.experts["scenario"].state_dict()]

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


def check_scenario_sharing(config):
    """``config['scenario_experts']``, checked: ``local`` or ``personalized``; ``personalized``
    in a federated run needs ``fed_strategy: pfmsmtrec`` with ``personalized_experts: True``
    (any other rule would average the scenarios' experts into one copy for all)."""
    value = config["scenario_experts"]
    if value not in SCENARIO_EXPERTS:
        raise ValueError(f"scenario_experts [{value}] must be one of {list(SCENARIO_EXPERTS)}.")
    if value == "personalized" and config["train_mode"] == "federated" and (
            config["fed_strategy"] != "pfmsmtrec" or not config["personalized_experts"]):
        raise ValueError(
            "scenario_experts: personalized sends the scenario-specific experts to the server, "
            "where only fed_strategy: pfmsmtrec with personalized_experts: True keeps each "
            f"scenario's own (here fed_strategy: {config['fed_strategy']}, personalized_experts: "
            f"{config['personalized_experts']} would average them into one copy for all): set "
            "both, or scenario_experts: local.")
    return value
