"""The shop's jobs. They live in an INSTALLED_APPS module, so djasync may run them."""

from __future__ import annotations

import logging
from decimal import Decimal
from functools import partial
from typing import Any

from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from djasync.models import Attempt, Group
from shop.models import Order, Receipt, SalesReport

logger = logging.getLogger(__name__)


def demo_backoff(attempt: int) -> float:
    """Retry at once (see DJASYNC in demo_project/settings.py: fine for a demo only)."""
    return 0.0


def write_receipt(order_id: int) -> dict[str, Any]:
    """Write the receipt for an order and "mail" it once the receipt is committed."""
    order = Order.objects.get(pk=order_id)
    receipt = Receipt.objects.create(order=order, number=f"R-{order.number}", total=order.total)
    if order.total <= 0:
        # The receipt created above is rolled back along with everything else this attempt
        # wrote; djasync records the attempt and retries the job until max_attempts.
        raise ValueError(f"order {order.number} has a total of {order.total}, refusing a receipt")
    # Effects outside the database wait for the commit: if the job failed after this line,
    # or the worker died before committing, no mail would have gone out for a missing receipt.
    transaction.on_commit(partial(_mail_receipt, receipt.number, order.customer))
    return {"receipt": receipt.number, "total": order.total}


def _mail_receipt(receipt_number: str, customer: str) -> None:
    logger.info("mailed receipt=%s to customer=%s", receipt_number, customer)


def notify_warehouse(order_id: int) -> str:
    """Tell the warehouse to ship an order; the (simulated) warehouse fails the first call.

    A real flaky service fails at random. The demo wants the same story on every run, so the
    first attempt at each order fails and the second succeeds. The job cannot remember its
    own first attempt in a table of its own: everything a failing attempt writes is rolled
    back. What survives is djasync's record of that attempt, so the job asks for it.
    """
    order = Order.objects.get(pk=order_id)
    tried_before = Attempt.objects.filter(
        job__name=f"{__name__}.notify_warehouse", job__args=[order_id]
    ).exists()
    if not tried_before:
        raise ConnectionError(f"warehouse did not answer about order {order.number} (simulated)")
    order.warehouse_notified_at = timezone.now()
    order.save(update_fields=["warehouse_notified_at"])
    return f"WH-{order.number}"


def follow_up(order_id: int) -> None:
    """Ask the customer how the order went (the demo schedules it for next week)."""
    logger.info("follow-up for order_id=%s", order_id)


def sales_report(batch: str) -> dict[str, Any]:
    """Sum up a batch of orders; runs as its group's final job, after every receipt job."""
    group = Group.objects.filter(reference=batch).latest("id")
    progress = group.progress()  # the group's jobs, the final job (this one) excluded
    receipts = Receipt.objects.filter(order__batch=batch)
    report = SalesReport.objects.create(
        batch=batch,
        orders=Order.objects.filter(batch=batch).count(),
        receipts=receipts.count(),
        revenue=receipts.aggregate(total=Sum("total"))["total"] or Decimal(0),
    )
    return {
        "orders": report.orders,
        "receipts": report.receipts,
        "revenue": report.revenue,
        "failed": progress["failed"],
        "pending_when_run": progress["pending"],
    }
