"""The sequences Triton's sequence client examples send (simple_*_sequence_*_client.py)
and what Triton's example models of those names return for them; shared by the HTTP
and gRPC tests."""

import uuid

SEQUENCE_VALUES = [11, 7, 5, 3, 2, 0, 1]


def sequence_plan(dyna):
    """The three sequences of Triton's sequence examples: (model, id, inputs)."""
    string_id = "1002" if dyna else str(uuid.uuid4())
    negated = [-v for v in SEQUENCE_VALUES]
    return [
        ("simple_dyna_sequence" if dyna else "simple_sequence", 1000, [0] + SEQUENCE_VALUES),
        ("simple_dyna_sequence" if dyna else "simple_sequence", 1001, [100] + negated),
        ("simple_string_dyna_sequence" if dyna else "simple_sequence", string_id, [20] + negated),
    ]


def expected_sequence_outputs(dyna, plan):
    """What Triton's example models return, step by step, for `sequence_plan(dyna)`."""
    expected = []
    for k, (_, sid, inputs) in enumerate(plan):
        outputs = []
        for i, value in enumerate(inputs):
            if k == 2 and dyna:  # the string dyna model accumulates, START adds nothing
                out = value + (outputs[-1] if outputs else 0)
            else:  # the others: INPUT + START
                out = value + (1 if i == 0 else 0)
            if dyna and i == len(inputs) - 1:  # the dyna models add the id at the end
                out += int(sid)
            outputs.append(out)
        expected.append(outputs)
    return expected
