// raftkacheck drives a Raftka broker with Go's Kafka clients as Debian
// packages them (sarama, kafka-go), built offline in GOPATH mode by
// tests/test_go_clients.py. Each step prints one line "step: result"; the
// test reads them. Exit status 1 on the first failure.
package main

import (
	"context"
	"fmt"
	"os"
	"sync/atomic"
	"time"

	"github.com/Shopify/sarama"
	kafkago "github.com/segmentio/kafka-go"
)

const records = 20

func fail(step string, err error) {
	fmt.Printf("%s: error %v\n", step, err)
	os.Exit(1)
}

func main() {
	broker, topic := os.Args[1], os.Args[2]
	cfg := sarama.NewConfig()
	cfg.Version = sarama.V2_1_0_0 // Produce v7 and Fetch v10: zstd
	cfg.Producer.Return.Successes = true
	cfg.Producer.RequiredAcks = sarama.WaitForAll
	cfg.Producer.Compression = sarama.CompressionZSTD
	cfg.Producer.Partitioner = sarama.NewManualPartitioner // each message names its partition
	cfg.Consumer.Offsets.Initial = sarama.OffsetOldest

	admin, err := sarama.NewClusterAdmin([]string{broker}, cfg)
	if err != nil {
		fail("admin", err)
	}
	if err := admin.CreateTopic(topic, &sarama.TopicDetail{NumPartitions: 2, ReplicationFactor: 1}, false); err != nil {
		fail("create", err)
	}
	fmt.Println("create: ok")
	retention := "3600000"
	if err := admin.AlterConfig(sarama.TopicResource, topic, map[string]*string{"retention.ms": &retention}, false); err != nil {
		fail("alter", err)
	}
	fmt.Println("alter: ok")

	producer, err := sarama.NewSyncProducer([]string{broker}, cfg)
	if err != nil {
		fail("produce", err)
	}
	for i := 0; i < records; i++ {
		message := &sarama.ProducerMessage{Topic: topic, Partition: int32(i % 2), Value: sarama.StringEncoder(fmt.Sprintf("go-%d", i))}
		if _, _, err := producer.SendMessage(message); err != nil {
			fail("produce", err)
		}
	}
	producer.Close()
	fmt.Println("produce: ok")

	consumer, err := sarama.NewConsumer([]string{broker}, cfg)
	if err != nil {
		fail("consume", err)
	}
	partition, err := consumer.ConsumePartition(topic, 0, sarama.OffsetOldest)
	if err != nil {
		fail("consume", err)
	}
	got, deadline := 0, time.After(20*time.Second)
	for got < records/2 {
		select {
		case <-partition.Messages():
			got++
		case err := <-partition.Errors():
			fail("consume", err)
		case <-deadline:
			fail("consume", fmt.Errorf("%d of %d records", got, records/2))
		}
	}
	consumer.Close()
	fmt.Printf("consume: %d\n", got)

	group, err := sarama.NewConsumerGroup([]string{broker}, "go-group", cfg)
	if err != nil {
		fail("group", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	handler := &groupHandler{want: records, cancel: cancel}
	defer cancel()
	for ctx.Err() == nil {
		if err := group.Consume(ctx, []string{topic}, handler); err != nil {
			fail("group", err)
		}
	}
	group.Close()
	if got := atomic.LoadInt64(&handler.got); got < records {
		fail("group", fmt.Errorf("%d of %d records", got, records))
	}
	fmt.Printf("group: %d\n", atomic.LoadInt64(&handler.got))

	conn, err := kafkago.Dial("tcp", broker)
	if err != nil {
		fail("kafka-go", err)
	}
	partitions, err := conn.ReadPartitions(topic)
	if err != nil {
		fail("kafka-go", err)
	}
	conn.Close()
	fmt.Printf("kafka-go partitions: %d\n", len(partitions))
}

type groupHandler struct {
	want, got int64 // got: records seen by every claim of the session (atomic)
	cancel    context.CancelFunc
}

func (h *groupHandler) Setup(sarama.ConsumerGroupSession) error   { return nil }
func (h *groupHandler) Cleanup(sarama.ConsumerGroupSession) error { return nil }

func (h *groupHandler) ConsumeClaim(session sarama.ConsumerGroupSession, claim sarama.ConsumerGroupClaim) error {
	for message := range claim.Messages() {
		session.MarkMessage(message, "")
		if atomic.AddInt64(&h.got, 1) >= h.want {
			h.cancel()
		}
	}
	return nil
}
