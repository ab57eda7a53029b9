"""What Bankly's customers come for: the BANKING77 categories the demo simulates.

Each intent pairs what the simulated user says (BANKING77 openings, replies to the agent's
questions) with what the scripted agent does (its questions, the tool it calls, its answer).
``kind`` names the failure planted in the agent for that intent:

* ``card``: the agent asks again for the card's last four digits the user gave at turn 1;
* ``transfer``: the agent passes the transfer reference to ``lookup_transfer`` as written;
* ``fx``: ``get_exchange_rate`` is slower than its configured timeout;
* ``healthy``: nothing planted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KINDS = ("card", "transfer", "fx", "healthy")


@dataclass(frozen=True)
class Intent:
    name: str  # the BANKING77 category
    kind: str  # one of KINDS
    questions: tuple[str, ...]  # the agent's clarifying questions, in order
    replies: tuple[tuple[str, ...], ...]  # the user's reply options, one tuple per question
    tool: str
    answer: str  # formatted with the tool result and the facts
    args: dict[str, Any] = field(default_factory=dict)  # fixed tool arguments (healthy intents)
    result: dict[str, Any] = field(default_factory=dict)  # the simulated backend's data
    optional_questions: int = 0  # trailing questions the agent asks only sometimes

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"intent {self.name}: kind must be one of {KINDS}, not {self.kind!r}")
        if len(self.replies) != len(self.questions):
            raise ValueError(f"intent {self.name}: one reply tuple per question")


INTENTS: dict[str, Intent] = {
    i.name: i
    for i in (
        # -- card: the repeated ask ----------------------------------------------------------------
        Intent(
            "card_arrival",
            "card",
            questions=(
                "Thanks for reaching out. When did you order the card?",
                "Got it. Is the delivery address in your Bankly profile still up to date?",
            ),
            replies=(
                (
                    "About 10 days ago.",
                    "It's been two weeks now",
                    "I ordered it last Monday",
                    "more than a week ago",
                ),
                ("yes", "Yes, same address", "yep, nothing changed"),
            ),
            tool="track_card_delivery",
            result={
                "status": "in_transit",
                "carrier": ["Royal Mail", "DPD"],
                "dispatched": ["3 working days ago", "yesterday"],
                "eta_working_days": [1, 2],
            },
            answer=(
                "Thanks. Your card ending in {card_last4} was dispatched {dispatched} with {carrier} "
                "and should arrive within {eta_working_days} working days. If it has not arrived by "
                "then, you can order a free replacement in Cards → Order a new card."
            ),
        ),
        Intent(
            "lost_or_stolen_card",
            "card",
            questions=(
                (
                    "That sounds stressful, so let's secure your account first. Do you see any "
                    "payments on the card that you don't recognise?"
                ),
                "Good. Shall I freeze the card now and order a replacement?",
            ),
            replies=(
                ("No, nothing odd so far", "not that I can see", "no"),
                ("yes please", "Yes, do it", "yes"),
            ),
            tool="freeze_card",
            result={"status": "frozen", "replacement": "ordered", "eta_working_days": [2, 3]},
            answer=(
                "Done: your card ending in {card_last4} is frozen, so nobody can use it, and a "
                "replacement is on its way (about {eta_working_days} working days). The new card "
                "has a new number; your PIN stays the same."
            ),
        ),
        # -- transfer: the tool argument format ----------------------------------------------------
        Intent(
            "transfer_not_received_by_recipient",
            "transfer",
            questions=("Thanks, I'll check it. How long ago did you send the money?",),
            replies=(("3 days ago", "on Monday", "it's been 5 days", "last Thursday"),),
            tool="lookup_transfer",
            result={
                "status": "completed",
                "completed": ["2 days ago", "yesterday"],
                "recipient_bank": ["Monzo", "Barclays", "Lloyds"],
            },
            answer=(
                "Transfer {transfer_id} left Bankly {completed} and was accepted by {recipient_bank}. "
                "Incoming payments can take up to one working day to show; if the recipient still "
                "does not see it tomorrow, they should contact {recipient_bank} with the reference "
                "{transfer_id}."
            ),
        ),
        Intent(
            "pending_transfer",
            "transfer",
            questions=("When did you make the transfer, and was it to a new recipient?",),
            replies=(
                (
                    "yesterday, yes it's a new payee",
                    "this morning, first time sending to them",
                    "2 days ago, new recipient",
                ),
            ),
            tool="lookup_transfer",
            result={
                "status": "pending",
                "reason": "first_transfer_review",
                "expected": ["by the end of today", "within 4 hours"],
            },
            answer=(
                "Transfer {transfer_id} is pending because a first payment to a new recipient gets a "
                "short security review. It should complete {expected}; you don't need to do anything."
            ),
        ),
        # -- fx: the config value ------------------------------------------------------------------
        Intent(
            "exchange_rate",
            "fx",
            questions=("Happy to check. Which currencies are you converting between?",),
            replies=(
                ("pounds to euros", "GBP to EUR", "from GBP into US dollars", "pounds to dollars"),
            ),
            tool="get_exchange_rate",
            answer=(
                "Right now 1 {base} = {rate} {quote}. Bankly applies the interbank rate with no "
                "markup on weekdays; a 0.5% markup applies at weekends."
            ),
        ),
        Intent(
            "card_payment_wrong_exchange_rate",
            "fx",
            questions=("Which payment was it: the merchant and roughly when?",),
            replies=(
                (
                    "a hotel in Lisbon on Friday, paid in euros",
                    "a restaurant in Paris yesterday",
                    "an online shop in the US last Tuesday, in dollars",
                ),
            ),
            tool="get_exchange_rate",
            answer=(
                "The payment was converted at 1 {base} = {rate} {quote}, the interbank rate on the "
                "day the merchant settled it. Settlement can come a day or two after the purchase, "
                "so the rate can differ from the one you saw when you paid."
            ),
        ),
        # -- healthy -------------------------------------------------------------------------------
        Intent(
            "terminate_account",
            "healthy",
            questions=("I'm sorry to see you go. Is there still money in the account?",),
            replies=(("yes, about 50 pounds", "no, it's empty", "a little, yes"),),
            tool="search_help_center",
            args={"query": "close my account"},
            result={"article": "Closing your account", "url": "https://help.bankly.example/close"},
            answer=(
                "You can close it yourself in Profile → Close account. Move any money left to "
                "another account first; the account closes within one working day and we email "
                "you a final statement."
            ),
        ),
        Intent(
            "change_pin",
            "healthy",
            questions=("Do you know your current PIN?", "Thanks. Are you in the UK at the moment?"),
            replies=(
                ("yes I do", "yes", "yes, I just want a new one"),
                ("yes", "no, I'm in Spain", "yes, in London"),
            ),
            optional_questions=1,
            tool="search_help_center",
            args={"query": "change card PIN"},
            result={"article": "Changing your PIN", "url": "https://help.bankly.example/pin"},
            answer=(
                "You can change your PIN at most cash machines: insert the card, enter your current "
                "PIN and choose PIN services → Change PIN. You can also view your PIN any time in "
                "Cards → Show PIN."
            ),
        ),
        Intent(
            "verify_my_identity",
            "healthy",
            questions=(
                (
                    "Which document would you like to use: passport, driving licence or national "
                    "ID card?"
                ),
            ),
            replies=(("passport", "my driving licence", "national ID card"),),
            tool="start_identity_check",
            args={"channel": "app"},
            result={"status": "link_sent", "expires_hours": 24},
            answer=(
                "I've sent a verification link to the app. Take a photo of your document and a "
                "short selfie video; most checks finish within 10 minutes. The link is valid for "
                "{expires_hours} hours."
            ),
        ),
        Intent(
            "apple_pay_or_google_pay",
            "healthy",
            questions=("Are you on an iPhone or an Android phone?",),
            replies=(("iPhone", "android", "I have a Samsung"),),
            tool="search_help_center",
            args={"query": "add card to Apple Pay or Google Pay"},
            result={
                "article": "Paying with your phone",
                "url": "https://help.bankly.example/wallets",
            },
            answer=(
                "Open the Bankly app, go to Cards → Add to wallet and follow the steps; it works "
                "for Apple Pay and Google Pay, and the card is ready to use in the wallet at once."
            ),
        ),
        Intent(
            "cash_withdrawal_charge",
            "healthy",
            questions=(
                "Which plan are you on: Standard or Plus?",
                "Thanks. Was the withdrawal in the UK or abroad?",
            ),
            replies=(
                ("Standard I think", "the free one", "Plus"),
                ("in the UK", "abroad, in France", "UK"),
            ),
            optional_questions=1,
            tool="get_fee_schedule",
            args={"fee": "atm_withdrawal"},
            result={"free_allowance": "£200 per month", "fee_after_allowance": "2%"},
            answer=(
                "Cash withdrawals are free up to {free_allowance}; after that a "
                "{fee_after_allowance} fee applies, which is the charge you saw. You can check your "
                "remaining allowance in Account → Plan."
            ),
        ),
        Intent(
            "edit_personal_details",
            "healthy",
            questions=(
                "Which detail would you like to change: your name, address or contact details?",
            ),
            replies=(("my address", "my name, I got married", "my home address, I moved"),),
            tool="search_help_center",
            args={"query": "update personal details"},
            result={
                "article": "Updating your details",
                "url": "https://help.bankly.example/details",
            },
            answer=(
                "You can update it yourself in Profile → Personal details. Name and address changes "
                "need a quick photo of a document showing the new details; we confirm them within a "
                "few minutes."
            ),
        ),
        Intent(
            "pending_top_up",
            "healthy",
            questions=("How did you top up: by card or by bank transfer?",),
            replies=(("with my debit card", "by card", "card top up"),),
            tool="get_top_up_status",
            args={"top_up": "latest"},
            result={"status": "processing", "expected": ["within 30 minutes", "within the hour"]},
            answer=(
                "Your latest top-up is being processed and should land {expected}. Card top-ups "
                "sometimes need an extra check by the card issuer, which is what is happening here."
            ),
        ),
    )
}
