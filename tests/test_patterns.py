"""The one check of parameter-name pattern settings (``recbole_cmr.utils.check_patterns``)."""

import logging

import pytest

from recbole_cmr.federated.personalized import starting_with
from recbole_cmr.utils import check_patterns, name_families, pattern_setting

NAMES = ["token_embedding_table.user_id.weight", "experts.shared.0.linear_0.weight",
         "experts.shared.0.bn_0.weight", "experts.shared.1.bn_0.running_mean",
         "experts.task_1.0.bn_0.weight", "towers.0.out.bias"]


class Settings(dict):
    """A config: values by key, and what the user set (RecBole's ``external_config_dict``)."""

    def __init__(self, values, user):
        super().__init__(values)
        self.external_config_dict = {k: values[k] for k in user}


def test_a_pattern_matching_nothing_names_the_setting_the_pattern_and_what_would_match():
    assert name_families(NAMES) == ["token_embedding_table.user_id.*", "experts.shared.*.linear_*.*",
                                    "experts.shared.*.bn_*.*", "experts.task_*.*.bn_*.*", "towers.*.out.*"]
    with pytest.raises(ValueError, match=r'^fed_bn_params: pattern "\*BatchNorm\*" matches no '
                                         r"parameter of the model; the parameters are \['token_"):
        check_patterns(NAMES, ["*.bn_*", "*BatchNorm*"], "fed_bn_params")
    with pytest.raises(ValueError, match=r'did you mean "experts\.shared\.\*"'):
        check_patterns(NAMES, ["experts.Shared.*"], "template_scenario_params")
    assert check_patterns(NAMES, ["*.bn_*", r"towers\.\d+\..*"], "key") == ["*.bn_*", r"towers\.\d+\..*"]


def test_select_decides_what_matches():
    """PF-MSMTrec's group regexes match a name's start, not the whole name."""
    assert check_patterns(NAMES, [r"experts\.[^.]+\.\d+"], "pf_expert_group", select=starting_with)
    with pytest.raises(ValueError, match="pf_expert_group"):
        check_patterns(NAMES, [r"experts\.[^.]+\.\d+"], "pf_expert_group")  # not a full match


def test_a_user_setting_is_checked_strictly_a_yaml_default_with_a_warning(caplog):
    values = {"fed_local_params": "*adapter*", "finetune_params": ["*adapter*"]}
    with caplog.at_level(logging.WARNING):
        assert pattern_setting(Settings(values, user=[]), "fed_local_params", NAMES) == ["*adapter*"]
    assert 'fed_local_params: pattern "*adapter*" matches no parameter' in caplog.text
    with pytest.raises(ValueError, match=r'^finetune_params: pattern "\*adapter\*"'):
        pattern_setting(Settings(values, user=["finetune_params"]), "finetune_params", NAMES)
