"""Accounts and orders on an in-memory SQLite database (tools: tools/accounts.json).

State (`state()`): {"customers": {"<id>": {"name", "email", "balance"}}, "orders": {"<id>": {"customer_id",
"status", "total", "items", "address": {"street", "city", "zip"}}}}; amounts in cents. Tasks: cancel a pending
order (credited to the store balance), refuse to cancel a shipped one, change a shipping address, and a
multi-turn cancellation where the user gives their e-mail address only when asked.
"""

from __future__ import annotations

import json
import random
import sqlite3

from kimi_jax.agentic.environment import Environment, ToolError
from kimi_jax.agentic.tasks import Checkpoint, Persona, Rubric, Task, make_agent, task_id, task_rng
from kimi_jax.agentic.tools import TOOLS_DIR, load_tool_file

NAME = "accounts"
TOOLS = load_tool_file(TOOLS_DIR / "accounts.json")
_FIRST = ["Ana", "Ben", "Chen", "Dana", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena"]
_LAST = ["Silva", "Okafor", "Novak", "Haddad", "Kim", "Moreau", "Rossi", "Tanaka"]
_ITEMS = ["desk lamp", "usb cable", "notebook", "coffee grinder", "backpack", "headphones", "kettle", "monitor arm"]
_CITIES = ["Springfield", "Riverton", "Lakeside", "Fairview", "Greenville"]
_REASONS = ["I ordered it twice by mistake", "I found it cheaper elsewhere", "I no longer need it"]


def money(cents: int) -> str:
    return f"${cents // 100}.{cents % 100:02d}"


def _address(rng: random.Random) -> dict:
    return {"street": f"{rng.randint(1, 999)} {rng.choice(['Oak', 'Elm', 'Main', 'Pine'])} St",
            "city": rng.choice(_CITIES), "zip": f"{rng.randint(10000, 99999)}"}


def make_setup(rng: random.Random) -> dict:
    """3-5 customers with 1-4 orders each; every customer has one pending order."""
    customers, orders = [], []
    for cid in range(1, rng.randint(3, 5) + 1):
        first = rng.choice(_FIRST)
        name = f"{first} {rng.choice(_LAST)}"
        customers.append({"id": cid, "name": name, "email": f"{first.lower()}{cid}@example.com",
                          "balance": rng.randint(0, 50) * 100})
        for k in range(rng.randint(1, 4)):
            items = sorted(rng.sample(_ITEMS, rng.randint(1, 3)))
            orders.append({"id": len(orders) + 1, "customer_id": cid, "items": items,
                           "status": "pending" if k == 0 else rng.choice(["shipped", "delivered", "cancelled"]),
                           "total": rng.randint(500, 20000), "address": _address(rng)})
    return {"customers": customers, "orders": orders}


class AccountsEnv(Environment):
    name = NAME

    def _setup(self, task: Task) -> None:
        self.db = sqlite3.connect(":memory:")
        self.db.executescript(
            "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, email TEXT UNIQUE, balance INTEGER);"
            "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers(id), "
            "items TEXT, status TEXT, total INTEGER, address TEXT);")
        self.db.executemany("INSERT INTO customers VALUES (?, ?, ?, ?)",
                            [(c["id"], c["name"], c["email"], c["balance"]) for c in task.setup["customers"]])
        self.db.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?)",
                            [(o["id"], o["customer_id"], json.dumps(o["items"]), o["status"], o["total"],
                              json.dumps(o["address"])) for o in task.setup["orders"]])

    def _order(self, order_id: int) -> dict:
        row = self.db.execute("SELECT id, customer_id, items, status, total, address FROM orders WHERE id = ?",
                              (order_id,)).fetchone()
        if row is None:
            raise ToolError(f"no order with id {order_id}")
        return {"order_id": row[0], "customer_id": row[1], "items": json.loads(row[2]), "status": row[3],
                "total_cents": row[4], "shipping_address": json.loads(row[5])}

    def _execute(self, name: str, a: dict):
        if name == "find_customer":
            row = self.db.execute("SELECT id, name, balance FROM customers WHERE email = ?", (a["email"],)).fetchone()
            if row is None:
                raise ToolError(f"no customer with e-mail {a['email']!r}")
            return {"customer_id": row[0], "name": row[1], "balance_cents": row[2]}
        if name == "list_orders":
            query, args = "SELECT id, status, total FROM orders WHERE customer_id = ?", [a["customer_id"]]
            if "status" in a:
                query, args = query + " AND status = ?", args + [a["status"]]
            rows = self.db.execute(query + " ORDER BY id DESC", args).fetchall()
            return {"orders": [{"order_id": r[0], "status": r[1], "total_cents": r[2]} for r in rows]}
        if name == "get_order":
            return self._order(a["order_id"])
        if name == "cancel_order":
            order = self._order(a["order_id"])
            if order["status"] != "pending":
                raise ToolError(f"order {a['order_id']} is {order['status']}; only pending orders can be cancelled")
            with self.db:
                self.db.execute("UPDATE orders SET status = 'cancelled' WHERE id = ?", (a["order_id"],))
                self.db.execute("UPDATE customers SET balance = balance + ? WHERE id = ?",
                                (order["total_cents"], order["customer_id"]))
            return {"order_id": a["order_id"], "status": "cancelled", "credited_cents": order["total_cents"]}
        if name == "update_shipping_address":
            order = self._order(a["order_id"])
            if order["status"] != "pending":
                raise ToolError(f"order {a['order_id']} is {order['status']}; only pending orders can be changed")
            self.db.execute("UPDATE orders SET address = ? WHERE id = ?", (json.dumps(a["address"]), a["order_id"]))
            return {"order_id": a["order_id"], "shipping_address": a["address"]}
        raise ToolError(f"tool {name!r} is not available in the {NAME} environment")

    def state(self) -> dict:
        customers = {str(r[0]): {"name": r[1], "email": r[2], "balance": r[3]}
                     for r in self.db.execute("SELECT id, name, email, balance FROM customers")}
        orders = {str(r[0]): {"customer_id": r[1], "items": json.loads(r[2]), "status": r[3], "total": r[4],
                              "address": json.loads(r[5])}
                  for r in self.db.execute("SELECT id, customer_id, items, status, total, address FROM orders")}
        return {"customers": customers, "orders": orders}


def make_task(seed: int, index: int) -> Task:
    """Task `index` under `seed` (module docstring lists the kinds), deterministic."""
    rng = task_rng(seed, index, NAME)
    setup = make_setup(rng)
    agent = make_agent("accounts and orders", TOOLS, rng)
    customer = rng.choice(setup["customers"])
    cid = customer["id"]
    mine = [o for o in setup["orders"] if o["customer_id"] == cid]
    pending = next(o for o in mine if o["status"] == "pending")
    kind = rng.choice(["cancel", "cancel_shipped", "address", "cancel_multiturn"])
    if kind == "cancel_shipped" and not any(o["status"] == "shipped" for o in mine):
        kind = "cancel"
    reason = rng.choice(_REASONS)
    tid = task_id(NAME, seed, index)
    hello = f"Hi, I'm {customer['name']} ({customer['email']})."
    if kind in ("cancel", "cancel_multiturn"):
        oid, total = pending["id"], pending["total"]
        goal = {f"orders/{oid}/status": "cancelled", f"customers/{cid}/balance": customer["balance"] + total}
        answer = f"Order {oid} is cancelled and {money(total)} was credited to your store balance."
        cancel = {"name": "cancel_order", "arguments": {"order_id": oid, "reason": reason}}
        criteria = (f"order {oid} is cancelled", f"the customer is told that {money(total)} was credited")
        if kind == "cancel":
            return Task(tid, NAME, agent, f"{hello} Please cancel order #{oid}, {reason}.", setup, goal,
                        Rubric(criteria, ("get_order", "cancel_order"),
                               (Checkpoint("get_order", {"order_id": oid}, "looked the order up first"),
                                Checkpoint("cancel_order", {"order_id": oid}, "cancelled the right order")),
                               (str(oid), money(total))),
                        ({"name": "get_order", "arguments": {"order_id": oid}}, cancel), answer)
        persona = Persona(customer["name"], rng.choice(["terse", "chatty", "polite"]),
                          {"e-mail address": customer["email"]})
        return Task(tid, NAME, agent, f"Hi, please cancel my pending order, {reason}.", setup, goal,
                    Rubric(criteria + ("the assistant asked for the e-mail address instead of guessing",),
                           ("find_customer", "list_orders", "cancel_order"),
                           (Checkpoint("find_customer", {"email": customer["email"]}, "identified the customer"),
                            Checkpoint("cancel_order", {"order_id": oid}, "cancelled the pending order")),
                           (str(oid), money(total))),
                    ({"say": "Sure. What is the e-mail address of your account?"},
                     {"name": "find_customer", "arguments": {"email": customer["email"]}},
                     {"name": "list_orders", "arguments": {"customer_id": cid, "status": "pending"}}, cancel),
                    answer, persona, difficulty=2)
    if kind == "cancel_shipped":
        order = next(o for o in mine if o["status"] == "shipped")
        oid = order["id"]
        return Task(tid, NAME, agent, f"{hello} Cancel order #{oid} please, {reason}.", setup,
                    {f"orders/{oid}/status": "shipped", f"customers/{cid}/balance": customer["balance"]},
                    Rubric((f"order {oid} is left as it is", "the customer is told it has already shipped"),
                           ("get_order",), (Checkpoint("get_order", {"order_id": oid}, "checked the status"),),
                           (str(oid), "shipped")),
                    ({"name": "get_order", "arguments": {"order_id": oid}},),
                    f"Order {oid} has already shipped, so it can no longer be cancelled.")
    oid, address = pending["id"], _address(rng)
    where = f"{address['street']}, {address['city']} {address['zip']}"
    return Task(tid, NAME, agent, f"{hello} Please ship order #{oid} to {where} instead.", setup,
                {f"orders/{oid}/address": address},
                Rubric((f"order {oid} ships to {where}",), ("get_order", "update_shipping_address"),
                       (Checkpoint("update_shipping_address", {"order_id": oid, "address": address},
                                   "set the new address"),), (str(oid), address["city"])),
                ({"name": "get_order", "arguments": {"order_id": oid}},
                 {"name": "update_shipping_address", "arguments": {"order_id": oid, "address": address}}),
                f"Order {oid} will now ship to {where}.")
