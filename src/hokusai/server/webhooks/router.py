"""/api/v1/webhooks (admin scope): subscriptions, their deliveries, redelivery and a test send.

Admin only: a subscription carries a secret and sends the service's events out of it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Response, status

from hokusai.server.auth.dependencies import allow
from hokusai.server.deps import Caller, Webhooks
from hokusai.server.errors import ErrorDetail
from hokusai.server.events.outbox import Actor
from hokusai.server.webhooks.schemas import (
    Delivery,
    DeliveryPage,
    DeliveryStatus,
    Webhook,
    WebhookCreate,
    WebhookCreated,
    WebhookList,
    WebhookTestResult,
    WebhookUpdate,
    WebhookUpdated,
)

router = APIRouter(prefix="/api/v1/webhooks", tags=["webhooks"], dependencies=[Depends(allow("webhooks:admin"))])

NOT_FOUND = {404: {"model": ErrorDetail, "description": "No such webhook"}}
REFUSED = {400: {"model": ErrorDetail, "description": "Invalid or non-public URL, or unknown event type pattern"}}


@router.post("", status_code=status.HTTP_201_CREATED, response_model=WebhookCreated, responses=REFUSED)
async def create_webhook(body: WebhookCreate, caller: Caller, webhooks: Webhooks) -> WebhookCreated:
    row, secret = await webhooks.create(
        body.url, body.event_types, body.model_names, body.enabled, body.description, created_by=caller.key_id
    )
    return WebhookCreated(**Webhook.of(row).model_dump(), secret=secret)


@router.get("", response_model=WebhookList)
async def list_webhooks(webhooks: Webhooks) -> WebhookList:
    return WebhookList(webhooks=[Webhook.of(row) for row in await webhooks.list()])


@router.get("/{webhook_id}", response_model=Webhook, responses=NOT_FOUND)
async def get_webhook(webhook_id: str, webhooks: Webhooks) -> Webhook:
    return Webhook.of(await webhooks.get(webhook_id))


@router.patch("/{webhook_id}", response_model=WebhookUpdated, responses={**NOT_FOUND, **REFUSED})
async def update_webhook(webhook_id: str, body: WebhookUpdate, webhooks: Webhooks) -> WebhookUpdated:
    given = body.model_dump(include=body.model_fields_set - {"rotate_secret"})
    row, secret = await webhooks.update(webhook_id, given, rotate_secret=body.rotate_secret)
    return WebhookUpdated(**Webhook.of(row).model_dump(), secret=secret)


@router.delete("/{webhook_id}", status_code=status.HTTP_204_NO_CONTENT, responses=NOT_FOUND)
async def delete_webhook(webhook_id: str, webhooks: Webhooks) -> Response:
    await webhooks.delete(webhook_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{webhook_id}/deliveries",
    response_model=DeliveryPage,
    responses={**NOT_FOUND, 400: {"model": ErrorDetail, "description": "Invalid cursor"}},
)
async def list_deliveries(
    webhook_id: str,
    webhooks: Webhooks,
    state: Annotated[DeliveryStatus | None, Query(alias="status", description="Only deliveries in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[str | None, Query(max_length=20)] = None,
) -> DeliveryPage:
    views, next_cursor = await webhooks.deliveries(webhook_id, state, limit, cursor)
    return DeliveryPage(deliveries=[Delivery.of(view.row, view.event_type) for view in views], next_cursor=next_cursor)


@router.post(
    "/{webhook_id}/deliveries/{delivery_id}/redeliver",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Delivery,
    responses={
        404: {"model": ErrorDetail, "description": "No such webhook or delivery"},
        409: {"model": ErrorDetail, "description": "A delivery of this event is pending, or the event is gone"},
    },
)
async def redeliver(
    webhook_id: str, delivery_id: Annotated[int, Path(ge=1, le=2**63 - 1)], webhooks: Webhooks
) -> Delivery:
    view = await webhooks.redeliver(webhook_id, delivery_id)
    return Delivery.of(view.row, view.event_type)


@router.post("/{webhook_id}/test", response_model=WebhookTestResult, responses=NOT_FOUND)
async def test_webhook(webhook_id: str, caller: Caller, webhooks: Webhooks) -> WebhookTestResult:
    """Send a signed `webhook.test` event to the URL now and answer how the receiver took it (the event is not
    in the log; nothing is stored)."""
    result = await webhooks.send_test(webhook_id, Actor.of(caller))
    return WebhookTestResult(
        success=result.success, status_code=result.status_code, latency_ms=result.latency_ms, error=result.error
    )
