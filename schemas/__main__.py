"""Write the plan's JSON Schema: ``python -m schemas > schemas/plan.schema.json``."""

import json

from schemas import json_schema

print(json.dumps(json_schema(), indent=2, sort_keys=True))
