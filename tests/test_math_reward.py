"""The built-in math reward pays for a stated final answer, never for restating the question."""

from __future__ import annotations

import pytest

from fp16rl.tasks.rewards import RewardError, RewardSet, math_format_reward, math_reward

QUESTION = "What is 5 + 17?"

# The question's own arithmetic, unevaluated, in every place a model could put it: none is an answer.
RESTATEMENTS = [
    "5 + 17", "5+17", "= 5 + 17", "return 5 + 17", "def add():\n    return 5 + 17", "print(5 + 17)",
    "x = 5 + 17", QUESTION, "$5 + 17$", "\\boxed{5+17}", "\\boxed{5 + 17}", "The answer is 5 + 17",
    "The answer is $5 + 17$.", "Final answer: 5+17", "#### 5 + 17", "Answer: 17 + 5",
    "The final answer is $\\boxed{5+17}$", "The sum 5 + 17 is what we want.", "<answer>5 + 17</answer>",
]
# A stated answer in the usual forms: each pays.
STATED = [
    "\\boxed{22}", "The answer is 22", "The answer is 22.", "The final answer is 22", "Final answer: 22",
    "Answer: 22", "**Answer:** 22", "The answer is **22**.", "#### 22", "Add them.\n#### 22", "22", "$22$",
    "We add 5 and 17.\n22", "The final answer is $\\boxed{22}$", "The answer is $22$.",
    "5 + 17 = 22, so the answer is 22.", "Final Answer: The final answer is $22$. I hope it is correct.",
    "\\boxed{22.0}", "<answer>22</answer>", "Thinking.\n<answer> 22 </answer>",
]


@pytest.mark.parametrize("completion", RESTATEMENTS)
def test_restating_the_question_pays_nothing(completion):
    assert math_reward([completion], ["22"]) == [0.0]
    assert math_reward([[{"role": "assistant", "content": completion}]], ["22"]) == [0.0]


@pytest.mark.parametrize("completion", STATED)
def test_a_stated_answer_pays(completion):
    assert math_reward([completion], ["22"]) == [1.0]
    assert math_reward([completion], ["23"]) == [0.0]  # and only when it is right


@pytest.mark.parametrize("completion,gold,expected", [
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0), ("\\boxed{0.5}", "\\frac{1}{2}", 1.0), ("The answer is 1/2", "0.5", 1.0),
    ("Final answer: 0.5", "1/2", 1.0), ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", 1.0), ("\\boxed{-\\frac{3}{4}}", "-0.75", 1.0),
    ("\\boxed{\\sqrt{2}}", "\\sqrt{2}", 1.0), ("\\boxed{1+\\sqrt{2}}", "1+\\sqrt{2}", 1.0), ("\\boxed{2\\pi}", "2\\pi", 1.0),
    ("\\boxed{x^2+1}", "x^2+1", 1.0), ("\\boxed{-7}", "-7", 1.0), ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{2.5 \\times 10^{3}}", "2500", 1.0), ("\\boxed{50\\%}", "50\\%", 1.0),
    # arithmetic left to do pays nothing, whatever numbers it uses ...
    ("\\boxed{2^{10}}", "1024", 0.0), ("The answer is $3 \\cdot 4$", "12", 0.0), ("\\boxed{\\frac{1}{2} + \\frac{1}{4}}", "0.75", 0.0),
    ("\\boxed{(5+17, 3)}", "(22, 3)", 0.0),
    # ... unless the gold answer is itself written that way
    ("\\boxed{2^{10}}", "2^{10}", 1.0), ("\\boxed{1024}", "2^{10}", 1.0),
    # an expression somewhere in the text is not a statement of the answer
    ("so x = 5, then 7", "7", 0.0), ("I get 22 here", "22", 0.0), ("", "22", 0.0),
])
def test_forms_of_answers(completion, gold, expected):
    assert math_reward([completion], [gold]) == [expected]


def test_the_gold_answer_may_be_a_solution_column_or_a_worked_solution():
    gsm8k = "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\n#### 72"
    assert math_reward(["\\boxed{72}", "#### 24"], answer=[gsm8k, gsm8k]) == [1.0, 0.0]
    assert math_reward(["The answer is 72."], solution=["So the total is $\\boxed{72}$."]) == [1.0]
    assert math_reward(["\\boxed{4}"], solution=["\\boxed{}"]) == [None]  # an unparsable gold answer is not scored
    # Through the reward set, as a dataset with a `solution` column reaches it.
    scores = RewardSet.build(["math"])([QUESTION] * 2, ["\\boxed{22}", "5 + 17"], [[]] * 2,
                                       {"solution": ["22", "22"]}, [0, 1])
    assert scores.rewards == [1.0, 0.0]
    with pytest.raises(RewardError, match="column named 'answer' or 'solution'"):
        RewardSet.build(["math"])([QUESTION], ["\\boxed{22}"], [[]], {"gold": ["22"]}, [0])


def test_builtin_rewards_import_like_trl_rewards():
    import fp16rl.tasks.rewards as rewards

    assert {"math_reward", "math_format_reward", "reasoning_gym"} <= set(rewards.__all__)
    assert RewardSet.build(["math", "math_format"]).functions == [math_reward, math_format_reward]
    assert math_format_reward(["\\boxed{22}", "\\boxed{1} or \\boxed{2}", "22"]) == [1.0, 0.0, 0.0]


def test_math_reward_off_the_main_thread():
    """math-verify's time limit uses signal.alarm, which only the main thread may set (TRL turns it off)."""
    import threading

    results: list = []
    worker = threading.Thread(target=lambda: results.append(math_reward(["\\boxed{22}", "5 + 17"], ["22", "22"])))
    worker.start()
    worker.join()
    assert results == [[1.0, 0.0]]
