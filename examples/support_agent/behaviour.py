"""How the agent's repository files steer its behaviour (pure: text in, settings out).

The scripted agent stands in for a model that follows its system prompt. The planted
failures depend on the prompt and config text through the rules below, so a change merged
into the agent's repository really changes what the agent does:

* **carry forward** — the prompt tells the agent to ask for the card's last four digits.
  It uses the digits the user already gave only when the prompt (or the config's
  ``instructions``) also tells it to carry details forward: a sentence matching
  :data:`CARRY_FORWARD` — "carry forward", "already gave/given/provided/shared/told",
  "do not / never ask (for ...) again|twice". closeloop's templated fix ("Carry forward
  what the user has already told you ... never ask for the card number again") matches.
* **transfer reference format** — without guidance the agent passes the reference to
  ``lookup_transfer`` as the user wrote it (``tr 55912``). It converts it to ``TR-55912``
  when the prompt, the config's ``instructions`` or ``tools.lookup_transfer.description``
  mentions the ``TR-`` form, or says in one sentence that ``lookup_transfer`` needs a
  format/shape (:data:`TRANSFER_FORMAT`; closeloop's templated fix "When you call the
  ``lookup_transfer`` tool, pass its arguments shaped exactly like ..." matches).
* **timeouts** — ``tools.<name>.timeout_s``, else ``tool_defaults.timeout_s``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

CARRY_FORWARD = re.compile(
    r"\bcarry(?:ing)?[ -]forward\b"
    r"|\balready (?:gave|given|provided|shared|told|mentioned)\b"
    r"|\b(?:do not|don't|never) (?:re-?)?ask (?:for (?:it|them|that|[\w' ]{1,40}) )?(?:again|twice)\b",
    re.IGNORECASE,
)
TRANSFER_FORMAT = re.compile(
    r"\bTR-"
    r"|\blookup_transfer\b[^.\n]{0,200}?\b(?:format(?:ted)?|shaped?)\b",
    re.IGNORECASE,
)
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MODEL = "gpt-4o-mini"


@dataclass(frozen=True)
class Behaviour:
    """The agent's settings as read from its repository at one commit."""

    system_prompt: str
    model: str = DEFAULT_MODEL
    temperature: float = 0.2
    max_output_tokens: int = 400
    agent_name: str = "bankly-support"
    max_turns: int = 8
    carries_forward: bool = False
    transfer_id_format: bool = False
    escalation_enabled: bool = True
    escalation_tool: str = "escalate_to_human"
    escalation_queue: str = "general-support"
    default_timeout_s: float = DEFAULT_TIMEOUT_S
    tools: dict[str, dict[str, Any]] = field(default_factory=dict)

    def timeout_s(self, tool: str) -> float:
        value = self.tools.get(tool, {}).get("timeout_s", self.default_timeout_s)
        return float(value)

    def tool_description(self, tool: str) -> str:
        return str(self.tools.get(tool, {}).get("description", ""))


def _section(cfg: dict[str, Any], key: str) -> dict[str, Any]:
    value = cfg.get(key) or {}
    if not isinstance(value, dict):
        raise TypeError(f"config/agent.yaml: {key!r} must be a mapping, not {type(value).__name__}")
    return value


def behaviour_from(system_prompt: str, config_yaml: str) -> Behaviour:
    """Read the prompt and the config (``config/agent.yaml``) into :class:`Behaviour`.

    >>> b = behaviour_from("Carry forward details the user already gave.", "tools: {}")
    >>> b.carries_forward, b.transfer_id_format
    (True, False)
    """
    cfg = yaml.safe_load(config_yaml) or {}
    if not isinstance(cfg, dict):
        raise TypeError("config/agent.yaml must hold a mapping")
    agent, model, esc = _section(cfg, "agent"), _section(cfg, "model"), _section(cfg, "escalation")
    tools = {str(k): (v if isinstance(v, dict) else {}) for k, v in _section(cfg, "tools").items()}
    extra = str(agent.get("instructions", "") or "")
    transfer_text = "\n".join(
        (system_prompt, extra, str(tools.get("lookup_transfer", {}).get("description", "")))
    )
    return Behaviour(
        system_prompt=system_prompt,
        model=str(model.get("name", DEFAULT_MODEL)),
        temperature=float(model.get("temperature", 0.2)),
        max_output_tokens=int(model.get("max_output_tokens", 400)),
        agent_name=str(agent.get("name", "bankly-support")),
        max_turns=int(agent.get("max_turns", 8)),
        carries_forward=bool(CARRY_FORWARD.search(system_prompt + "\n" + extra)),
        transfer_id_format=bool(TRANSFER_FORMAT.search(transfer_text)),
        escalation_enabled=bool(esc.get("enabled", True)),
        escalation_tool=str(esc.get("tool", "escalate_to_human")),
        escalation_queue=str(esc.get("queue", "general-support")),
        default_timeout_s=float(_section(cfg, "tool_defaults").get("timeout_s", DEFAULT_TIMEOUT_S)),
        tools=tools,
    )
