"""The tutorial's room consumer: join the group, broadcast each frame to it, send what arrives."""
import json

from channels.generic.websocket import AsyncWebsocketConsumer


class ReferenceRoomConsumer(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        self.group_name = f"room_{self.scope['url_route']['kwargs']['slug']}"
        await self.channel_layer.group_add(self.group_name, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(self.group_name, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        body = json.loads(text_data)["body"]
        await self.channel_layer.group_send(self.group_name, {"type": "chat.message", "body": body})

    async def chat_message(self, event: dict) -> None:
        await self.send(text_data=json.dumps({"body": event["body"]}))
